"""The closing summary a run prints (pipelines.outputs.summary)."""

import json

import pipelines.base.quiet  # noqa: F401  (before TensorFlow)

from pipelines import batch
from pipelines.outputs import summary as summary_lib

# A table without aggregates and without a label: the batch run stops after
# statistics and validation, the quickest run that prints its summary.
PLAIN = """
name: plain
roles: {id: key}
fields:
  key: {type: string, required: true}
  size: {type: int, required: true, min: 0, max: 100}
"""


def test_aggregate_line_only_for_tables_with_aggregates():
  assert summary_lib.aggregate_lines({}) == []
  assert summary_lib.aggregate_lines({'user_id': 12, 'merchant_id': 3}) == [
      'Aggregate rows:        user_id: 12, merchant_id: 3']


def test_batch_summary_of_a_table_without_aggregates(tmp_path, capsys):
  schema = tmp_path / 'plain.yaml'
  schema.write_text(PLAIN)
  data = tmp_path / 'plain.jsonl'
  data.write_text(''.join(json.dumps({'key': f'k{i}', 'size': i}) + '\n'
                          for i in range(5)))
  code = batch.main(['--schema', str(schema), '--input', str(data),
                     '--output_dir', str(tmp_path / 'out')])
  assert code == 0
  printed = capsys.readouterr().out.splitlines()
  assert 'Feature rows:          5' in printed
  assert not [line for line in printed if line.startswith('Aggregate rows')]
