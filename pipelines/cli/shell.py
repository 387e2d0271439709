"""The command shell: every command's `main` runs its body through
`run_command`, which turns the project's errors (pipelines.base.errors) into
one line on stderr and their exit code. An exception outside the hierarchy
is a failure during the run: one line (and, when the command gives one, the
traceback in a log file), exit 3; never a traceback on the terminal.
"""

import sys
import traceback
from typing import Callable, Optional

from pipelines.base.errors import ProjectError, RunError
from pipelines.outputs.files import use_pipeline_options


def failure_line(error: BaseException) -> str:
  """`error: the run failed: <type>: <first line>`."""
  first = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return f'error: the run failed: {type(error).__name__}: {first}'


def run_command(body: Callable[[], Optional[int]],
                on_failure: Optional[Callable[[BaseException], str]] = None
                ) -> int:
  """Runs `body` (returns an exit code or None for 0) and maps errors.

  `on_failure(error) -> line`: what to print for an exception outside the
  hierarchy (a command writes the traceback beside its outputs there);
  default `failure_line`.
  """
  try:
    use_pipeline_options()   # s3:// paths of driver-only commands
    return body() or 0
  except ProjectError as e:
    print(f'error: {e}', file=sys.stderr)
    return e.exit_code
  except KeyboardInterrupt:
    print('error: interrupted', file=sys.stderr)
    return RunError.exit_code
  except Exception as e:  # pylint: disable=broad-except
    try:
      line = on_failure(e) if on_failure else failure_line(e)
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc(limit=0)
      line = failure_line(e)
    print(line, file=sys.stderr)
    return RunError.exit_code
