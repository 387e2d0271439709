"""The run report: one self-contained HTML page per batch run.

    python -m pipelines.report --output_dir data/output

rewrites <output_dir>/report/index.html from the run's files (e.g. after
`pipelines.monitor` added monitoring/report.json); a batch run writes it
at its end (`publish`), with metrics.prom and its line of the run history.

The page has no script and loads nothing: one <style> block, inline SVG
(plots by matplotlib's SVG backend; the feature histograms are
pipelines.validation.stats_report's), links relative to the page. Sections, each
present only when the run has what it shows (a features-only run, one the
validation gate stopped and a scoring-only run leave out what they did not
do): summary, stages, records, anomalies, drift, model, curves,
calibration, scores, risk, registry, monitoring, features, history,
outputs. Nothing in it reads the clock: rendering the same folder twice
gives the same page (the stage durations are the run's measurements).
"""

import sys

from pipelines.reporting.report import main

if __name__ == '__main__':
  sys.exit(main())
