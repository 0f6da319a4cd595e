"""Domain errors. The API layer maps each class to one HTTP status, in one place."""


class VicdError(Exception):
    """Our own fault, or one we cannot classify: HTTP 500."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidParameter(VicdError):
    """The request is malformed or asks for something impossible: HTTP 400."""

    status = 400


class NotFound(VicdError):
    """No such container, image, exec, ...: HTTP 404."""

    status = 404


class Conflict(VicdError):
    """The object is in a state that forbids the request: HTTP 409."""

    status = 409


class NotModified(VicdError):
    """Already in the requested state (start a running container): HTTP 304."""

    status = 304


class Forbidden(VicdError):
    """Allowed in general, refused here (overlapping pools, active endpoints): HTTP 403."""

    status = 403
