package sparkify;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.attribute.PosixFilePermission;
import java.util.EnumSet;
import java.util.Set;

import org.apache.hadoop.fs.Path;
import org.apache.hadoop.fs.RawLocalFileSystem;
import org.apache.hadoop.fs.permission.FsPermission;
import org.apache.hadoop.io.nativeio.NativeIO;

/**
 * Hadoop's local file system, with permissions set through java.nio.
 *
 * <p>Without Hadoop's native library (pip's pyspark has none), RawLocalFileSystem sets the permission
 * of every file and folder it creates by starting a {@code chmod} process. A table written in
 * ~10,000 partition folders starts ~30,000 of them, which is most of the write's time. The resulting
 * permissions are the same; only the way of setting them differs.
 */
public class NioRawLocalFileSystem extends RawLocalFileSystem {
  // Bit i of a POSIX mode, lowest first: others x, w, r, group x, w, r, owner x, w, r.
  private static final PosixFilePermission[] MODE_BITS = {
    PosixFilePermission.OTHERS_EXECUTE, PosixFilePermission.OTHERS_WRITE, PosixFilePermission.OTHERS_READ,
    PosixFilePermission.GROUP_EXECUTE, PosixFilePermission.GROUP_WRITE, PosixFilePermission.GROUP_READ,
    PosixFilePermission.OWNER_EXECUTE, PosixFilePermission.OWNER_WRITE, PosixFilePermission.OWNER_READ,
  };

  @Override
  public void setPermission(Path path, FsPermission permission) throws IOException {
    int mode = permission.toShort();
    // The native library is fast already; sticky and set-id bits have no java.nio equivalent.
    if (NativeIO.isAvailable() || (mode & ~0777) != 0) {
      super.setPermission(path, permission);
      return;
    }
    Set<PosixFilePermission> bits = EnumSet.noneOf(PosixFilePermission.class);
    for (int i = 0; i < MODE_BITS.length; i++) {
      if ((mode & (1 << i)) != 0) {
        bits.add(MODE_BITS[i]);
      }
    }
    Files.setPosixFilePermissions(pathToFile(path).toPath(), bits);
  }
}
