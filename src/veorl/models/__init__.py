"""Networks of VeoRL (see docs/method.md, "Networks"). Imports no data or env code."""
