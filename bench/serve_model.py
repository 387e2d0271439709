"""The scoring service's model step alone, this tree beside a peer (by
hand, not a test).

    python -m bench.serve_model --model_dir M --peer_tree DIR [--rows 1,32]

Loads the model of `--model_dir` twice in one process, with this tree's
`transforms/inference.py` and with the peer checkout's (e.g. `git archive
<commit> | tar -x -C DIR`), checks both give the same matrix, then calls
`transformed_matrix` (the transform graph) and `predict_table` (graph,
estimator, prediction columns) on a batch of `--rows` made-up rows, in
alternating rounds, optionally `--gap_ms` apart (the service at a low
rate: idle between calls). Prints the process CPU per call (TensorFlow's
threads included) and the machine's 1-minute load average: the cost of one
model call of the service, which the machine's other load inflates less
than it inflates latency.
"""

import argparse
import functools
import importlib.util
import os
import time

import pipelines.base.quiet  # noqa: F401  (first: silences TensorFlow)

import numpy as np
import pyarrow as pa

from transforms import inference


def _peer_inference(tree: str):
  spec = importlib.util.spec_from_file_location(
      'peer_inference', os.path.join(tree, 'transforms', 'inference.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main(argv=None):
  p = argparse.ArgumentParser(prog='python -m bench.serve_model')
  p.add_argument('--model_dir', default='data/output/model')
  p.add_argument('--peer_tree', required=True)
  p.add_argument('--rows', default='1,32')
  p.add_argument('--calls', type=int, default=100,
                 help='Calls per round and step.')
  p.add_argument('--rounds', type=int, default=6)
  p.add_argument('--gap_ms', type=float, default=0.0)
  args = p.parse_args(argv)
  peer = _peer_inference(args.peer_tree)
  models = {'this tree': (inference, inference.TransformedSklearnModelHandler(
      args.model_dir).load_model()),
            'peer': (peer, peer.TransformedSklearnModelHandler(
                args.model_dir).load_model())}
  metadata = models['this tree'][1].metadata
  id_field = metadata['id_field']
  schema = pa.schema(inference.input_types(metadata, id_field).items())
  made_up = {pa.string(): 'a', pa.float64(): 1.5, pa.int64(): 3}
  print('| rows | step | tree | CPU ms/call | load avg |')
  print('|---:|---|---|---:|---:|')
  for rows in [int(r) for r in args.rows.split(',')]:
    table = pa.Table.from_pylist(
        [{f.name: made_up[f.type] for f in schema}] * rows, schema=schema)
    matrices = [module.transformed_matrix(model, table)
                for module, model in models.values()]
    assert np.array_equal(*matrices), 'the trees transform differently'
    steps = {}
    for name, (module, model) in models.items():
      steps[('transformed_matrix', name)] = functools.partial(
          module.transformed_matrix, model, table)
      steps[('predict_table', name)] = functools.partial(
          module.predict_table, model, table, id_field)
    spent = {key: 0.0 for key in steps}
    load = 0.0
    for k in range(args.rounds):
      # Alternate the order, so neither tree always follows the other.
      for key in (list(steps) if k % 2 == 0 else list(steps)[::-1]):
        steps[key]()
        start = time.process_time()
        for _ in range(args.calls):
          if args.gap_ms:
            time.sleep(args.gap_ms / 1000)
          steps[key]()
        spent[key] += time.process_time() - start
      load = max(load, os.getloadavg()[0])
    for (step, name), seconds in spent.items():
      print(f'| {rows} | {step} | {name} | '
            f'{seconds / (args.calls * args.rounds) * 1e3:.2f} | {load:.1f} |')


if __name__ == '__main__':
  main()
