"""The HTTP layer: OpenAI wire format plus ``explain`` / ``explanations``."""
