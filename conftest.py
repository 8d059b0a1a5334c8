pytest_plugins = ["leadwerk_platform.testing.plugin"]
