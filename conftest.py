# The doctests of the library run with --doctest-modules; test-suite conftest files hold no doctests.
collect_ignore = ["tests/conftest.py", "property_tests/conftest.py", "benchmarks", "docs"]
