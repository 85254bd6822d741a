package bridge.interop;

import java.io.ByteArrayOutputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Map;
import java.util.TreeMap;
import java.util.stream.Stream;
import org.apache.avro.Schema;
import org.apache.avro.SchemaParser;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericDatumWriter;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.BinaryEncoder;
import org.apache.avro.io.EncoderFactory;
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

  /**
   * `record` in Confluent's wire format: 00, `schemaId` (the registry's id of its schema) as 4
   * bytes big-endian, the body. Unlike a fingerprint, the id says nothing without the registry.
   */
  static byte[] confluent(int schemaId, GenericRecord record) throws IOException {
    ByteArrayOutputStream out = new ByteArrayOutputStream();
    DataOutputStream header = new DataOutputStream(out);
    header.writeByte(0);
    header.writeInt(schemaId); // DataOutputStream writes big-endian
    BinaryEncoder body = EncoderFactory.get().directBinaryEncoder(out, null);
    new GenericDatumWriter<GenericRecord>(record.getSchema(), GenericData.get()).write(record, body);
    body.flush();
    return out.toByteArray();
  }
}
