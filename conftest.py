"""A checkout's pytest loads snapproof's plugin from here (its fixtures, options and hooks: snapproof/fixtures.py).

An installed snapproof, editable or not, has pytest load the same module by its entry point, registered under
this name: pytest then skips asking again, so the plugin is never registered twice.
"""

pytest_plugins = ("snapproof.fixtures",)
