"""Folders a command makes, and taking them back when it fails: no empty folder left behind."""
from pathlib import Path


def missing_folders(path):
    """``path`` and those of its parents that do not exist yet, deepest first: what making it creates."""
    path = Path(path)
    return [folder for folder in (path, *path.parents) if not folder.exists()]


def remove_empty(folders):
    """Removes ``folders`` (deepest first) while they are empty; stops at the first that holds
    anything. Folders already gone are passed over."""
    for folder in folders:
        if not folder.exists():
            continue
        if not folder.is_dir() or any(folder.iterdir()):
            break
        folder.rmdir()
