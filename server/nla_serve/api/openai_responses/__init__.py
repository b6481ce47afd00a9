"""The OpenAI Responses API over the chat pipeline: the request converted to a chat request
(``convert``), the answer written as a Response object or its event stream (``shape``)."""
