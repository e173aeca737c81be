"""Networks of VeoRL (see /work/shared/docs/veorl-method.md, "Networks"). Imports no data or env code."""
