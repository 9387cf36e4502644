"""lm-lite installs on its own: its version is consistent and the siblings it requires are in range."""


def test_distribution(package_checks):
    package_checks.distribution("lm-lite", "lm_lite")


def test_cli_group_from_lm_and_from_its_own_script(package_checks):
    package_checks.cli_group("lm-lite", "lite")
