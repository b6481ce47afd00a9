"""Anthropic's Messages API over the chat pipeline: the request converted to a chat request
(``convert``), the answer written as a Message (``shape``) or its event stream (``events``)."""
