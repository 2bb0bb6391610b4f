package sparkify;

import org.apache.hadoop.fs.LocalFileSystem;

/** The usual checksummed local file system (file://), over {@link NioRawLocalFileSystem}. */
public class NioLocalFileSystem extends LocalFileSystem {
  public NioLocalFileSystem() {
    super(new NioRawLocalFileSystem());
  }
}
