# Makes the package importable by its tests without installing it (pytest
# puts the directory of a conftest.py on sys.path).
