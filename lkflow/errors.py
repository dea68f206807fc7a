"""The one exception lkflow raises for mistakes a user can fix."""


class LkflowError(ValueError):
    """A bad value given to lkflow; the message names it, the accepted values and the fix.

    It subclasses `ValueError`, so code that already catches `ValueError` keeps working.

    Example:
        >>> try:
        ...     raise LkflowError("Received: gpus='x'. Expected an int, a list of ints or '0,1'.")
        ... except ValueError as err:
        ...     print(err)
        Received: gpus='x'. Expected an int, a list of ints or '0,1'.
    """
