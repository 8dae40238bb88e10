"""Sphinx configuration for hydraclean's documentation (built by `make docs`, warnings are errors)."""

import hydraclean

project = "hydraclean"
author = "hydraclean developers"
release = version = hydraclean.__version__
# sphinx-mathjax-offline copies MathJax into _static and points mathjax_path there (no CDN)
extensions = ["sphinx.ext.autodoc", "sphinx.ext.mathjax", "sphinx-mathjax-offline", "sphinx.ext.viewcode", "numpydoc",
              "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_generated/*.md"]
autodoc_typehints = "none"  # numpydoc sections carry the types
numpydoc_show_class_members = False
numpydoc_xref_param_type = False
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
html_theme = "pydata_sphinx_theme"
html_title = "hydraclean"
html_theme_options = {"navigation_with_keys": False}
suppress_warnings = ["myst.header"]  # the generated tables are fragments included mid-page
