package bridge.interop;

import java.io.IOException;
import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;

/**
 * Prints "FULL_NAME FINGERPRINT" for every record schema in the given directories: Apache Avro's
 * CRC-64-AVRO fingerprint of the schema's Parsing Canonical Form, as 16 hex digits.
 *
 * <p>Usage: Fingerprint DIR[,DIR...]
 */
public final class Fingerprint {
  private Fingerprint() {}

  public static void main(String[] args) throws IOException {
    for (Schema schema : Schemas.load(args[0].split(",")).values()) {
      if (schema.getType() == Schema.Type.RECORD) {
        long fingerprint = SchemaNormalization.parsingFingerprint64(schema);
        System.out.printf("%s %016x%n", schema.getFullName(), fingerprint);
      }
    }
  }
}
