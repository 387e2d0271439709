"""The project's one error hierarchy: every error a command can meet extends
one of three bases, and the base carries the exit code (and the HTTP status
the scoring service answers with). `pipelines.cli.shell` maps them to the one
line on stderr and the exit code, in one place for every command.

  UsageError  exit 2, HTTP 400: bad flags, declaration, input, model or
              output folder, found before any job starts.
  GateStopped exit 1, HTTP 422: the data validation gate stopped the run.
  RunError    exit 3, HTTP 500: a failure during the run.

Each project exception also keeps the builtin it was before (ValueError,
RuntimeError), so code that catches those still does.
"""


class ProjectError(Exception):
  """Base of every project exception; subclasses set the codes."""
  exit_code = 3
  http_status = 500


class UsageError(ProjectError):
  """Bad usage or input, before any job starts: exit 2."""
  exit_code = 2
  http_status = 400


class GateStopped(ProjectError):
  """Stopped by the validation gate: exit 1."""
  exit_code = 1
  http_status = 422


class RunError(ProjectError):
  """Failed during the run: exit 3."""
  exit_code = 3
  http_status = 500
