"""Data: reading FER2013 in the forms people bring it (sources, forms), finding duplicate faces
(duplicates), and carving the splits (split). Imports only the base modules of ferpipe."""
