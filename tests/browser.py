"""Opens a page in headless Chromium over the DevTools protocol.

    with Browser() as browser:
      page = browser.open('/tmp/out/report/index.html', 'shot.png')
      page.requests, page.console_errors, page.exceptions, page.sections

Chromium (Debian's `chromium`; `MLPIPE_CHROMIUM` names another binary)
starts with a fresh --user-data-dir and the flags below, on a DevTools port
it picks itself (read back from DevToolsActivePort). The page is loaded in
a new tab after Network, Runtime, Log and Page are enabled, so every
request the page makes is seen (Network.requestWillBeSent), as is every
console message (Runtime.consoleAPICalled), uncaught exception
(Runtime.exceptionThrown) and browser log entry (Log.entryAdded: failed
loads, blocked content, CSP errors). A missing browser is an error, never
a skip.
"""

import base64
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from typing import Any, Dict, List, Optional

import websocket  # websocket-client

FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run',
         '--disable-background-networking', '--disable-component-update',
         '--disable-sync', '--hide-scrollbars', '--mute-audio',
         '--remote-debugging-port=0', '--window-size=1280,900']
START_TIMEOUT = 60.0   # seconds for Chromium to open its DevTools port
LOAD_TIMEOUT = 60.0    # seconds for a page's load event


class BrowserError(RuntimeError):
  pass


def chromium_path() -> str:
  """The Chromium binary; BrowserError (a failure, not a skip) without one."""
  path = os.environ.get('MLPIPE_CHROMIUM') or shutil.which('chromium') or (
      shutil.which('chromium-browser'))
  if not path:
    raise BrowserError('chromium not found: install it (apt-get install -y '
                       'chromium; .ci/run does) or set MLPIPE_CHROMIUM')
  return path


@dataclasses.dataclass
class Page:
  url: str
  requests: List[str]          # every URL the page asked for, in order
  console_errors: List[str]    # console.error/assert, log entries of level error
  exceptions: List[str]        # uncaught script exceptions
  sections: List[str]          # ids of <section> elements, in order
  visible_plots: int           # <svg class="plot"> with a non-empty box
  title: str
  screenshot: Optional[str]
  # Layout faults: badges broken over two lines, quantile tables wider
  # than the feature card holding them; feature histograms drawn.
  wrapped_badges: int = 0
  overflowing_quantiles: int = 0
  histograms: int = 0


class Browser:
  """One headless Chromium for several pages (a context manager)."""

  def __init__(self):
    self._profile = tempfile.mkdtemp(prefix='mlpipe-chromium-')
    self._process = subprocess.Popen(
        [chromium_path(), *FLAGS, f'--user-data-dir={self._profile}',
         'about:blank'],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    self._port = self._devtools_port()
    self._next_id = 0

  def _devtools_port(self) -> int:
    marker = os.path.join(self._profile, 'DevToolsActivePort')
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
      if self._process.poll() is not None:
        raise BrowserError('chromium exited at start: ' +
                           self._process.stderr.read().decode()[-2000:])
      if os.path.exists(marker):
        lines = open(marker, encoding='utf-8').read().split()
        if lines:
          return int(lines[0])
      time.sleep(0.1)
    raise BrowserError(f'chromium opened no DevTools port in {START_TIMEOUT}s')

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self):
    if self._process.poll() is None:
      self._process.terminate()
      try:
        self._process.wait(timeout=20)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
    self._process.stderr.close()
    shutil.rmtree(self._profile, ignore_errors=True)

  # DevTools ---------------------------------------------------------------
  def _http(self, path: str, method: str = 'GET', parse: bool = True) -> Any:
    request = urllib.request.Request(f'http://127.0.0.1:{self._port}{path}',
                                     method=method)
    with urllib.request.urlopen(request, timeout=30) as response:
      text = response.read().decode('utf-8')
    return json.loads(text) if parse else text

  def _send(self, ws, method: str, params=None, events=None,
            timeout: float = LOAD_TIMEOUT) -> Dict[str, Any]:
    """Sends a command and returns its result; events that arrive meanwhile
    go to `events`."""
    self._next_id += 1
    ws.send(json.dumps({'id': self._next_id, 'method': method,
                        'params': params or {}}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      message = json.loads(ws.recv())
      if message.get('id') == self._next_id:
        if 'error' in message:
          raise BrowserError(f'{method}: {message["error"]}')
        return message.get('result', {})
      if events is not None and 'method' in message:
        events.append(message)
    raise BrowserError(f'{method}: no answer in {timeout}s')

  def open(self, path: str, screenshot: Optional[str] = None) -> Page:
    """Loads the file `path` in a new tab and reports what happened."""
    url = 'file://' + os.path.abspath(path)
    target = self._http('/json/new?about:blank', method='PUT')
    ws = websocket.create_connection(target['webSocketDebuggerUrl'],
                                     timeout=LOAD_TIMEOUT,
                                     suppress_origin=True)
    events: List[Dict[str, Any]] = []
    try:
      for domain in ('Network', 'Runtime', 'Log', 'Page'):
        self._send(ws, f'{domain}.enable', events=events)
      self._send(ws, 'Page.navigate', {'url': url}, events=events)
      deadline = time.monotonic() + LOAD_TIMEOUT
      while not any(e['method'] == 'Page.loadEventFired' for e in events):
        if time.monotonic() > deadline:
          raise BrowserError(f'{url}: no load event in {LOAD_TIMEOUT}s')
        events.append(json.loads(ws.recv()))
      found = self._evaluate(ws, events, """(() => ({
          title: document.title,
          sections: [...document.querySelectorAll('section[id]:not(.feature)')]
                    .map(s => s.id),
          plots: [...document.querySelectorAll('svg.plot')]
                 .filter(s => { const r = s.getBoundingClientRect();
                                return r.width > 50 && r.height > 50; })
                 .length,
          wrapped: [...document.querySelectorAll('.badge')]
                   .filter(b => b.getClientRects().length > 1 ||
                                b.getBoundingClientRect().height > 24)
                   .length,
          overflowing: [...document.querySelectorAll('.feature .quant')]
                       .filter(q => q.getBoundingClientRect().right >
                                    q.closest('.feature')
                                     .getBoundingClientRect().right + 0.5 ||
                                    q.scrollWidth > q.clientWidth + 1)
                       .length,
          histograms: [...document.querySelectorAll('.feature svg.hist')]
                      .filter(s => s.getBoundingClientRect().width > 50)
                      .length}))()""")
      shot = None
      if screenshot:
        shot = self._screenshot(ws, events, screenshot)
      # A round trip after everything: late events have arrived by now.
      self._evaluate(ws, events, '1')
    finally:
      ws.close()
      self._http(f'/json/close/{target["id"]}', parse=False)
    return Page(
        url=url,
        requests=[e['params']['request']['url'] for e in events
                  if e['method'] == 'Network.requestWillBeSent'],
        console_errors=[_console_text(e) for e in events if _is_error(e)],
        exceptions=[json.dumps(e['params']['exceptionDetails'])[:500]
                    for e in events
                    if e['method'] == 'Runtime.exceptionThrown'],
        sections=found['sections'], visible_plots=found['plots'],
        title=found['title'], screenshot=shot,
        wrapped_badges=found['wrapped'],
        overflowing_quantiles=found['overflowing'],
        histograms=found['histograms'])

  def _evaluate(self, ws, events, expression: str):
    result = self._send(ws, 'Runtime.evaluate',
                        {'expression': expression, 'returnByValue': True},
                        events=events)
    if 'exceptionDetails' in result:
      raise BrowserError(f'evaluate failed: {result["exceptionDetails"]}')
    return result['result'].get('value')

  def _screenshot(self, ws, events, path: str) -> str:
    """A PNG of the whole page (up to 16000 px tall)."""
    metrics = self._send(ws, 'Page.getLayoutMetrics', events=events)
    size = metrics.get('cssContentSize') or metrics['contentSize']
    width, height = int(size['width']), min(int(size['height']), 16000)
    shot = self._send(ws, 'Page.captureScreenshot', {
        'format': 'png', 'captureBeyondViewport': True,
        'clip': {'x': 0, 'y': 0, 'width': width, 'height': height,
                 'scale': 1}}, events=events)
    with open(path, 'wb') as f:
      f.write(base64.b64decode(shot['data']))
    return path


def _is_error(event) -> bool:
  method, params = event['method'], event.get('params', {})
  if method == 'Runtime.consoleAPICalled':
    return params.get('type') in ('error', 'assert', 'warning')
  if method == 'Log.entryAdded':
    return params.get('entry', {}).get('level') in ('error', 'warning')
  return False


def _console_text(event) -> str:
  params = event['params']
  if event['method'] == 'Log.entryAdded':
    entry = params['entry']
    return f'{entry.get("source")}: {entry.get("text")} {entry.get("url", "")}'
  return ' '.join(str(a.get('value', a.get('description', '')))
                  for a in params.get('args', []))
