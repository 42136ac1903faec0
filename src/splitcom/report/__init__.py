"""Reports of finished runs (``splitcom report``): runs.py reads them, tables.py and plots.py compare them,
markdown.py and html.py write them, build.py puts it together; export.py writes a plain PEFT adapter."""
