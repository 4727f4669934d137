"""Errors users see: each names the file, tensor or field that is wrong."""


class ModelFolderError(ValueError):
    """A model folder is missing something, or holds something the engine refuses to read."""
