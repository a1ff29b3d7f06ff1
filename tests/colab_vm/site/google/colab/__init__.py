"""A stand-in for Colab's `google.colab` package, for the Colab-shaped test (tests/test_colab.py): only what the
series calls. It is on the path of the test's VM kernels only, never of the project's code or of other tests."""
