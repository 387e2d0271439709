"""Empty files on s3://: Beam 2.72's S3 file system writes every file as a
multipart upload and completes it with the parts it uploaded, none for an
empty file (a sink's empty shard, a folder's _SUCCESS marker), which S3
refuses (MalformedXML: a multipart upload needs at least one part). S3
takes a single empty part, so when a file ends with no part this uploads
one before completing: the fix boto3-based writers elsewhere made
(arrow-rs object_store #91, distribution/distribution #3763).

`install()` is called when the modules that write files are imported
(transforms.sinks, pipelines.outputs.files), so it is in place in every
process that writes, workers included. It applies once; a later Beam that
uploads a part itself is left as it is (the added part is only for an
upload with none).
"""

try:
  from apache_beam.io.aws import s3io
except ImportError:  # Beam without its [aws] extra: no s3:// at all
  s3io = None


def _finish_with_a_part(finish):
  def finish_(self):
    if not self.parts and not self.buffer and self.last_error is None:
      self._write_to_s3(b'')   # pylint: disable=protected-access
    return finish(self)
  finish_.mlpipe_one_part = True
  return finish_


def install():
  """Makes Beam's S3 writer upload one empty part for an empty file."""
  if s3io is not None and not getattr(s3io.S3Uploader.finish,
                                      'mlpipe_one_part', False):
    s3io.S3Uploader.finish = _finish_with_a_part(s3io.S3Uploader.finish)
