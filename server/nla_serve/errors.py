"""The error tree of nla-serve, split by who is at fault.

    NLAServeError                      base; carries an HTTP status and an OpenAI error type
    ├── ClientError (400)              the request is wrong; the message says what to change
    │   ├── UnsupportedParameterError  a parameter this server does not implement (400)
    │   ├── ContextLengthError         prompt + max_tokens exceed the model's context (400)
    │   ├── AuthenticationError (401)
    │   ├── ForbiddenError (403)       a route this server keeps closed (audit routes without --admin-key)
    │   ├── NotFoundError (404)        unknown model or route
    │   └── PayloadTooLargeError (413)
    ├── OverloadedError (429)          the server is full; retry later
    ├── UnavailableError (503)         not ready, shutting down, or an engine died
    └── ServerError (500)              our fault
        ├── EngineError                an engine failed or is not running
        └── CheckpointError            an NLA or model folder is malformed (raised at load time)

Every class knows its HTTP status and OpenAI ``type`` so that one function in the API layer can
turn any of them into an OpenAI-shaped JSON error.
"""

from __future__ import annotations


class NLAServeError(Exception):
    status_code: int = 500
    error_type: str = "internal_server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ClientError(NLAServeError):
    status_code = 400
    error_type = "invalid_request_error"


class UnsupportedParameterError(ClientError):
    pass


class ContextLengthError(ClientError):
    pass


class AuthenticationError(ClientError):
    status_code = 401
    error_type = "authentication_error"


class ForbiddenError(ClientError):
    status_code = 403
    error_type = "permission_error"


class NotFoundError(ClientError):
    status_code = 404
    error_type = "not_found_error"


class PayloadTooLargeError(ClientError):
    status_code = 413
    error_type = "invalid_request_error"


class OverloadedError(NLAServeError):
    """Too many requests right now (429); retry later."""

    status_code = 429
    error_type = "rate_limit_error"


class UnavailableError(NLAServeError):
    """The service cannot answer at all right now (503): starting, stopping, or an engine is down."""

    status_code = 503
    error_type = "service_unavailable_error"


class ServerError(NLAServeError):
    status_code = 500
    error_type = "internal_server_error"


class EngineError(ServerError):
    pass


class CheckpointError(ServerError):
    """A model or NLA folder does not hold what the released format promises.

    The message names the file, the field and what was expected, e.g.
    ``av/nla_meta.yaml: tokens.injection_token_id is 17 but 'ψ' encodes to [5, 9]; expected one token``.
    """

    def __init__(self, file: str, field: str | None, problem: str):
        where = f"{file}: {field}" if field else file
        super().__init__(f"{where}: {problem}", param=field)
        self.file = file
        self.field = field
        self.problem = problem
