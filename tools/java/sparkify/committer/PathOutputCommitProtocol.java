package sparkify.committer;

import java.io.IOException;
import java.io.UncheckedIOException;

import org.apache.hadoop.fs.Path;
import org.apache.hadoop.mapreduce.OutputCommitter;
import org.apache.hadoop.mapreduce.TaskAttemptContext;
import org.apache.hadoop.mapreduce.lib.output.PathOutputCommitter;
import org.apache.hadoop.mapreduce.lib.output.PathOutputCommitterFactory;
import org.apache.spark.internal.io.FileNameSpec;
import org.apache.spark.internal.io.HadoopMapReduceCommitProtocol;

import scala.Option;

/**
 * Minimal stand-in for spark-hadoop-cloud's
 * {@code org.apache.spark.internal.io.cloud.PathOutputCommitProtocol}, which is not
 * shipped with the pyspark wheel.
 *
 * <p>Why it exists: Spark's stock {@link HadoopMapReduceCommitProtocol} always asks the
 * output format for its committer (for parquet: ParquetOutputCommitter, i.e. the classic
 * FileOutputCommitter) and places task files under {@code dest/_temporary/...}. On S3 that
 * committer "renames" every file twice (task commit + job commit), and an S3 rename is a
 * COPY plus a DELETE per object. Hadoop's S3A committers avoid this, but Spark only reaches
 * them if the commit protocol (a) creates the committer through Hadoop's
 * {@link PathOutputCommitterFactory} (which honours
 * {@code mapreduce.outputcommitter.factory.scheme.s3a} and {@code fs.s3a.committer.name}) and
 * (b) writes task output to that committer's own work path. For the magic committer the work
 * path is {@code dest/__magic/...}; S3AFileSystem turns writes there into multipart uploads
 * that are only completed at job commit, so no data is copied.
 *
 * <p>For other filesystems (file://, hdfs://) the factory returns the plain FileOutputCommitter,
 * whose work path is the usual {@code _temporary} attempt directory, so behaviour there is the
 * same as Spark's default. Parquet summary files ({@code _metadata}) are not written, which is
 * already Spark's default (parquet.summary.metadata.level=NONE), so no
 * BindingParquetOutputCommitter is needed: this class never consults
 * {@code spark.sql.parquet.output.committer.class}.
 *
 * <p>Everything else (task commit coordination, job commit bookkeeping, abort, files written
 * to absolute paths for custom partition locations) is inherited unchanged from
 * HadoopMapReduceCommitProtocol.
 */
public class PathOutputCommitProtocol extends HadoopMapReduceCommitProtocol {

  private static final long serialVersionUID = 1L;

  /** Destination directory as given by Spark; kept because the parent's copy is private. */
  private final String destination;

  /**
   * The committer for the current job or task. Transient: the protocol object is serialized
   * from the driver to executors, and each side creates its own committer in setupCommitter.
   */
  private transient PathOutputCommitter pathCommitter;

  /**
   * Constructor signature required by {@code FileCommitProtocol.instantiate}.
   *
   * <p>Dynamic partition overwrite is refused: Spark implements it by writing into a
   * {@code .spark-staging-*} directory and renaming whole partitions at job commit, which
   * bypasses the committer's work path (and would be copy-heavy on S3 anyway). Refusing here,
   * in the constructor, matters: Spark instantiates the protocol on the driver before it deletes
   * anything for an overwrite, so the job fails without touching existing data.
   */
  public PathOutputCommitProtocol(String jobId, String dest, boolean dynamicPartitionOverwrite) {
    super(jobId, dest, false);
    if (dynamicPartitionOverwrite) {
      throw new UnsupportedOperationException(
          "sparkify.committer.PathOutputCommitProtocol does not support dynamic partition "
              + "overwrite (spark.sql.sources.partitionOverwriteMode=dynamic). Use static "
              + "overwrite, or unset spark.sql.sources.commitProtocolClass for this job.");
    }
    this.destination = dest;
  }

  /** Two-argument form, also tried by {@code FileCommitProtocol.instantiate}. */
  public PathOutputCommitProtocol(String jobId, String dest) {
    this(jobId, dest, false);
  }

  /**
   * Create the committer via Hadoop's factory mechanism instead of the output format, so the
   * per-scheme factory (S3ACommitterFactory for s3a://) picks the committer.
   */
  @Override
  public OutputCommitter setupCommitter(TaskAttemptContext context) {
    try {
      pathCommitter = PathOutputCommitterFactory.createCommitter(new Path(destination), context);
    } catch (IOException e) {
      throw new UncheckedIOException(
          "Could not create an output committer for " + destination, e);
    }
    return pathCommitter;
  }

  /**
   * Place each task file under the committer's work path (plus the partition subdirectory),
   * rather than under Spark's assumed {@code _temporary} layout. This is what lets the magic
   * committer see the file as a pending upload.
   */
  @Override
  public String newTaskTempFile(
      TaskAttemptContext taskContext, Option<String> dir, FileNameSpec spec) {
    Path workPath;
    try {
      workPath = pathCommitter.getWorkPath();
    } catch (IOException e) {
      throw new UncheckedIOException("Could not get the committer's work path", e);
    }
    Path parent = dir.isDefined() ? new Path(workPath, dir.get()) : workPath;
    return new Path(parent, getFilename(taskContext, spec)).toString();
  }
}
