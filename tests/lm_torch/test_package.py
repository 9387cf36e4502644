"""lm-torch installs on its own: its version is consistent and the siblings it requires are in range."""


def test_distribution(package_checks):
    package_checks.distribution("lm-torch", "lm_torch")


def test_engine_config_imports_without_torch():
    import subprocess
    import sys

    code = (
        "import sys\nfrom lm_torch import TorchEngineConfig\n"
        "config = TorchEngineConfig(session_len=64, quant_policy=8)\n"
        "print('torch' in sys.modules, config.scheduler.session_len)\n"
        "import lm_torch\nprint(lm_torch.TorchEngine.__name__, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "64", "TorchEngine", "True"]
