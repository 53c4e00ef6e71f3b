"""Errors raised for bad datasets. Every message names the file or folder at fault."""


class DatasetError(ValueError):
    """A dataset cannot be used as given (missing, corrupt or mismatched files, empty split).

    ``path`` is the file or folder at fault when there is one.
    """

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = None if path is None else str(path)


class MissingFilesError(DatasetError):
    """A split names ids whose image or mask file does not exist.

    ``missing`` maps each folder to the ids missing from it.
    """

    def __init__(self, message, missing):
        super().__init__(message)
        self.missing = missing

    @property
    def ids(self):
        return sorted({i for ids in self.missing.values() for i in ids})
