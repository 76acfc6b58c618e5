"""Evaluation: options (EvalOptions), targets and data (what is evaluated, on what), models (which service
runs which model), run (the evaluation over the models) with logprobs, metrics, judges and revealed
preferences, the report (report_markdown, report_plots), and evaluate (the entry point)."""
