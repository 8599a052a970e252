"""The one exception type a user can cause; `main` prints it as a single line."""


class UserError(Exception):
  """Bad input (config value, dataset, checkpoint): the message says what and what to do."""
