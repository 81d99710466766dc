"""The one exception type that means "the user's input is wrong": the CLI prints it as one line, exit 2."""


class UserError(Exception):
    """Bad input or usage. The message names the file, dataset or option and says what to do."""
