# Puts the repository root on sys.path so tests import the working tree's packages.
