"""A mixed archive for the tests: images beside objects that are not images, copies, a mosaic, patients."""
