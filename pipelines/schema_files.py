"""Writes the committed artefacts derived from each dataset declaration.

    python -m pipelines.schema_files            # refresh every schemas/*.avsc, *.pbtxt

A test checks that the committed files equal what this writes, so a change
to a declaration that forgets this step fails CI.
"""

import glob
import json
import os
import sys

import pipelines.base.quiet  # noqa: F401  (first: silences TensorFlow)

from schemas.dataset import SCHEMA_DIR, load_dataset


def artefacts(declaration_path: str):
  """{path: text} of the files derived from one declaration."""
  from google.protobuf import text_format
  dataset = load_dataset(declaration_path)
  base = os.path.splitext(declaration_path)[0]
  return {
      base + '.avsc': json.dumps(dataset.avro_schema(), indent=2) + '\n',
      base + '.schema.pbtxt': text_format.MessageToString(
          dataset.tfdv_schema()),
  }


def main() -> int:
  for declaration in sorted(glob.glob(os.path.join(SCHEMA_DIR, '*.yaml'))):
    for path, text in artefacts(declaration).items():
      with open(path, 'w', encoding='utf-8') as f:
        f.write(text)
      print(f'wrote {os.path.relpath(path)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
