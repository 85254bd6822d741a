package bridge.interop;

import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Collection;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.TreeMap;
import org.apache.avro.AvroRuntimeException;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.avro.message.SchemaStore;

/**
 * Reads bridge dead letters (single-object encoded bridge.DeadLetter records) with Apache Avro's
 * own decoder, and the job payload nested in each, found by the fingerprint in its own header.
 * Prints one JSON object per file: {"dead_letter": {...}, "payload": {...} or null}, bytes as hex.
 * A payload that does not decode (the letter's reason may be just that: unknown_schema,
 * undecodable, unknown_type) is null, and "payload_error" says why.
 *
 * <p>Only the single-object framing: letters that workers with a registry URL wrote in the
 * Confluent wire format are not read.
 *
 * <p>Usage: ReadDeadLetter DIR[,DIR...] FILE...
 */
public final class ReadDeadLetter {
  private ReadDeadLetter() {}

  public static void main(String[] args) throws IOException {
    Map<String, Schema> schemas = Schemas.load(args[0].split(","));
    SchemaStore store = Schemas.store(schemas);
    BinaryMessageDecoder<GenericRecord> letters =
        new BinaryMessageDecoder<>(GenericData.get(), schemas.get("bridge.DeadLetter"), store);
    ObjectMapper json = new ObjectMapper();
    for (int i = 1; i < args.length; i++) {
      GenericRecord letter = letters.decode(Files.readAllBytes(Path.of(args[i])));
      GenericRecord envelope = (GenericRecord) letter.get("envelope");
      Map<String, Object> out = new LinkedHashMap<>();
      out.put("dead_letter", plain(letter));
      out.put("payload", null);
      if (envelope != null) {
        try {
          out.put("payload", plain(payload(envelope, schemas, store)));
        } catch (IOException | AvroRuntimeException e) {
          out.put("payload_error", e.toString()); // and read on: one bad payload hides no letter
        }
      }
      System.out.println(json.writeValueAsString(out));
    }
  }

  /** The envelope's payload, read with the schema that its `type` names. */
  static GenericRecord payload(GenericRecord envelope, Map<String, Schema> schemas, SchemaStore store)
      throws IOException {
    Schema reader = schemas.get(envelope.get("type").toString());
    if (reader == null) {
      throw new AvroRuntimeException("no schema named " + envelope.get("type"));
    }
    ByteBuffer bytes = ((ByteBuffer) envelope.get("payload")).duplicate();
    return new BinaryMessageDecoder<GenericRecord>(GenericData.get(), reader, store).decode(bytes);
  }

  /** A decoded datum as plain values for JSON: records and maps as objects, bytes as hex. */
  static Object plain(Object datum) {
    if (datum instanceof GenericRecord record) {
      Map<String, Object> out = new LinkedHashMap<>();
      for (Schema.Field field : record.getSchema().getFields()) {
        out.put(field.name(), plain(record.get(field.pos())));
      }
      return out;
    }
    if (datum instanceof Map<?, ?> map) {
      Map<String, Object> out = new TreeMap<>();
      map.forEach((key, value) -> out.put(key.toString(), plain(value)));
      return out;
    }
    if (datum instanceof Collection<?> items) {
      return items.stream().map(ReadDeadLetter::plain).toList();
    }
    if (datum instanceof ByteBuffer buffer) {
      byte[] bytes = new byte[buffer.remaining()];
      buffer.duplicate().get(bytes);
      return HexFormat.of().formatHex(bytes);
    }
    if (datum instanceof CharSequence text) {
      return text.toString();
    }
    return datum; // null, Boolean, Integer, Long, Float, Double
  }
}
