"""The one exception the input side raises for anything a user can get wrong.

Every message names the file (or folder), says what is wrong with it and what to do about it.
"""


class InputError(Exception):
    """A sample's input (folder, event file, video) is missing, unreadable or malformed."""
