"""lm-torch installs on its own: its version is consistent and the siblings it requires are in range."""


def test_distribution(package_checks):
    package_checks.distribution("lm-torch", "lm_torch")
