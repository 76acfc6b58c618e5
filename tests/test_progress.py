"""Progress: the core reports, listeners show it; a bar on a terminal, periodic lines otherwise."""

from __future__ import annotations

import contextvars
import io
import threading

from character import progress
from character.progress import ConsoleProgress, Event


class Recorder(list):
    def __call__(self, ev: Event) -> None:
        self.append(ev)


def test_stage_updates_reach_the_listeners_of_this_context_only():
    seen = Recorder()
    progress.update(3)  # outside a stage: nothing, no error
    with progress.listening(seen):
        with progress.stage("dpo_data", total=4):
            progress.update(1)
            progress.update(4)
        progress.report("building", 2, 2)
        progress.note("sft", "skipped: finished")
        other = Recorder()

        def in_thread():
            with progress.listening(other):
                with progress.stage("x", total=1):
                    progress.update(1)

        t = threading.Thread(target=contextvars.copy_context().run, args=(in_thread,))
        t.start()
        t.join()
        bare = threading.Thread(target=progress.report, args=("lost", 1, 1))  # no copied context: no listener
        bare.start()
        bare.join()
    progress.report("after", 1, 1)
    assert [(e.stage, e.done, e.total, e.finished) for e in seen if e.stage != "x"][:5] == [
        ("dpo_data", 0, 4, False),
        ("dpo_data", 1, 4, False),
        ("dpo_data", 4, 4, False),
        ("dpo_data", 4, 4, True),
        ("building", 2, 2, True),
    ]
    assert seen[5] == Event("sft", message="skipped: finished")
    assert [e.stage for e in seen].count("x") == 3 and [e.stage for e in other] == ["x"] * 3  # a copied context
    assert not any(e.stage in ("lost", "after") for e in seen)


def test_a_failed_stage_does_not_report_itself_finished():
    seen = Recorder()
    with progress.listening(seen):
        try:
            with progress.stage("dpo", total=5):
                progress.update(2)
                raise RuntimeError
        except RuntimeError:
            pass
    assert [e.finished for e in seen] == [False, False]  # started, 2 of 5, and no "done"


def test_console_without_a_terminal_writes_a_line_at_start_every_interval_and_at_the_end():
    out = io.StringIO()
    console = ConsoleProgress(out, every_s=3600)
    for i in range(1, 11):
        console(Event("dpo_data", i, 10, finished=i == 10))
    console(Event("dpo_data", message="skipped: finished at 2026"))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("dpo_data: progress 1/10 (10%) after 0:0")
    assert lines[1].startswith("dpo_data: done 10/10 (100%) after ") and len(lines) == 3
    assert lines[2] == "dpo_data: skipped: finished at 2026"
    quiet = io.StringIO()
    ConsoleProgress(quiet, notes=False)(Event("x", message="hidden"))
    assert quiet.getvalue() == ""


def test_console_on_a_terminal_draws_a_bar_in_place():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    console = ConsoleProgress(out, width=10)
    console(Event("sft", 5, 10))
    console(Event("sft", 10, 10, finished=True))
    text = out.getvalue()
    assert text.startswith("\rsft [#####-----] 5/10 0:00") and "\rsft [##########] 10/10 0:00" in text
    assert text.endswith("\n") and text.count("\n") == 1


def test_a_rerun_notes_each_skipped_stage(tmp_path):
    from character.build import stages as pipeline
    from character.build.frame import finished
    from character.build.record import record_stage
    from character.build.stages import PipelineConfig

    cfg = PipelineConfig(persona="pirate", workdir=str(tmp_path), build_id="done")
    data = cfg.build_dir() / "data" / "train" / "dpo.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("{}\n")
    record_stage(cfg, "dpo_data", {"path": str(data)})
    record_stage(cfg, "introspection", {"path": str(tmp_path / "gone.jsonl")})
    seen = Recorder()
    with progress.listening(seen):
        assert pipeline.stage_dpo_data(cfg) == str(data)  # no model needed: nothing is redone
        assert finished(cfg, "introspection") is None
    assert seen[0].stage == "dpo_data" and seen[0].message.startswith("skipped: finished at ")
    assert seen[1].stage == "introspection" and "gone.jsonl is gone: doing it again" in seen[1].message
