package bridge.interop;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Map;
import java.util.TreeMap;
import java.util.stream.Stream;
import org.apache.avro.Schema;
import org.apache.avro.SchemaParser;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.message.BinaryMessageEncoder;
import org.apache.avro.message.SchemaStore;

/** Bridge's schema directories (bridge/schemas, tests/schemas) read with Apache Avro. */
final class Schemas {
  private Schemas() {}

  /** Every named schema in the .avsc files of `dirs`, by full name; references may cross files. */
  static Map<String, Schema> load(String... dirs) throws IOException {
    SchemaParser parser = new SchemaParser();
    for (String dir : dirs) {
      try (Stream<Path> files = Files.list(Path.of(dir))) {
        for (Path file : files.filter(f -> f.toString().endsWith(".avsc")).sorted().toList()) {
          parser.parse(file);
        }
      }
    }
    Map<String, Schema> byName = new TreeMap<>();
    for (Schema schema : parser.getParsedNamedSchemas()) {
      byName.put(schema.getFullName(), schema);
    }
    return byName;
  }

  /** A store that finds the writer schema named by a single-object header's fingerprint. */
  static SchemaStore store(Map<String, Schema> schemas) {
    SchemaStore.Cache store = new SchemaStore.Cache();
    schemas.values().forEach(store::addSchema);
    return store;
  }

  /** `record` in Avro's single-object encoding: C3 01, its schema's fingerprint, the body. */
  static byte[] singleObject(GenericRecord record) throws IOException {
    ByteArrayOutputStream out = new ByteArrayOutputStream();
    new BinaryMessageEncoder<GenericRecord>(GenericData.get(), record.getSchema()).encode(record, out);
    return out.toByteArray();
  }
}
