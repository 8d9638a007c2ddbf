"""Built-in passes, one module each. Each is registered through the `graphopt.passes` entry-point group
(pyproject.toml), as an outside package's passes would be; importing this package imports none of them."""
