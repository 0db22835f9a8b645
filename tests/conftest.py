import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# End-to-end modules: the pipeline under kfp.local, the demo, training launchers (torchrun,
# DeepSpeed), DVC, real servers driven by evaluation clients. `make test` runs everything;
# `make test-fast` (`-m "not e2e"`) leaves these out for a quick loop while editing.
E2E_MODULES = {
    "tests/pipelines/test_pipeline.py", "tests/pipelines/test_demo.py",
    "tests/pipelines/test_generate.py", "tests/components/test_dvc.py", "tests/components/test_train_launch.py",
    "tests/components/test_train_run.py", "tests/components/test_evaluate_e2e.py",
    "tests/components/test_evaluate_async.py", "tests/components/test_evaluate_libero.py",
    "tests/components/test_small_policy.py", "tests/serving/test_registered_server.py",
    "tests/pipelines/test_reports_in_browser.py",  # mlflow ui and Chromium: ~1 min
    "tests/pipelines/test_run_resume.py",  # vaops run killed in training, then rerun: ~3 min
}


def pytest_collection_modifyitems(config, items):
    import pytest

    root = config.rootpath
    for item in items:
        if item.path.relative_to(root).as_posix() in E2E_MODULES:
            item.add_marker(pytest.mark.e2e)
