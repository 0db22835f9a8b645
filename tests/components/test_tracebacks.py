"""The error a failed process printed, read back from its output as one line."""

import re

from vaops.components.tracebacks import describe_failure, last_exception

FRAMES = ["Traceback (most recent call last):", '  File "/x/stage.py", line 3, in run',
          "    raise DatasetError(msg)", "    ^^^^^^^^^^^^^^^^^^^^^^"]


def test_the_last_traceback_gives_type_and_message_on_one_line():
    log = ["\x1b[96mstarting\x1b[0m", *FRAMES, "ValueError: first", "",
           "During handling of the above exception, another exception occurred:", "", *FRAMES,
           "vaops.components.dataset.DatasetError: data/x: episode 3", "  missing (2): a, b", "",
           "12:00:01.000 - ERROR - Task 'clean' finished with status FAILURE"]
    assert last_exception(log) == "DatasetError: data/x: episode 3 missing (2): a, b"


def test_types_without_error_in_their_name_and_empty_messages():
    assert last_exception([*FRAMES, "KeyboardInterrupt"]) == "KeyboardInterrupt"
    assert last_exception([*FRAMES, "mod.UnStableError: "]) == "UnStableError"
    assert last_exception([*FRAMES, "StopIteration: done", "[KFP Executor 2026-11-29 20:33:16,671 INFO]: done"]) == "StopIteration: done"


def test_a_launcher_report_is_passed_over_for_the_rank_error():
    for prefix in ("", "[rank1]: "):  # torch prefixes each rank's lines under torchrun
        log = [*(prefix + line for line in [*FRAMES, "FloatingPointError: step 1: loss is nan"]), *FRAMES,
               "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ", "train FAILED"]
        assert describe_failure(log, ignore=("ChildFailedError",)) == "FloatingPointError: step 1: loss is nan"


def test_no_traceback_gives_the_last_words():
    assert describe_failure(["working", "vaops train: --dataset and --output are required", ""]) == \
        "vaops train: --dataset and --output are required"
    assert describe_failure([]) is None


def test_a_runner_log_line_inside_the_traceback_is_not_taken_for_the_exception():
    # kfp.local's own record landed between the frames and the exception line (both streams busy)
    lines = ["Traceback (most recent call last):", '  File "steps.py", line 30, in dataset_source',
             "    result = run(IngestConfig(...))",
             "21:31:26.961 - ERROR - Task 'dataset-source' finished with status FAILURE",
             "vaops.components.dataset.DatasetError: /data/no-such-repo: cannot fetch"]
    assert describe_failure(lines) == "DatasetError: /data/no-such-repo: cannot fetch"


def test_an_exception_line_without_its_traceback_header_reads_the_same():
    lines = ["12:00:00.000 - INFO - Executing task 'dataset-source'", "    result = run(IngestConfig(...))",
             "vaops.components.dataset.DatasetError: /data/no-such-repo: cannot fetch",
             "12:00:01.000 - ERROR - Task 'dataset-source' finished with status FAILURE"]
    skip = re.compile(r"^\d{2}:\d{2}:\d{2}(\.\d+)? - [A-Z]+ - ")
    assert describe_failure(lines, skip=skip) == "DatasetError: /data/no-such-repo: cannot fetch"
