package bridge.interop;

import java.util.HashMap;
import java.util.List;
import java.util.Map;
import org.apache.avro.Schema;

/**
 * Enqueues one test.Echo job on a bridge queue (a Kafka topic) like KafkaEnqueue, but framed in
 * Confluent's wire format with ids from a Confluent-compatible schema registry: the
 * bridge.JobEnvelope and the test.Echo in its `payload` each carry their own schema's id.
 * Prints the job id once Kafka acknowledged it.
 *
 * <p>Usage: RegistryEnqueue DIR[,DIR...] REGISTRY_URL BOOTSTRAP QUEUE N TEXT KEY, where
 * REGISTRY_URL is the Confluent API's base, e.g. http://127.0.0.1:8081/apis/ccompat/v7.
 */
public final class RegistryEnqueue {
  private RegistryEnqueue() {}

  public static void main(String[] args) throws Exception {
    Map<String, Schema> schemas = Schemas.load(args[0].split(","));
    Map<String, Integer> ids = register(new Registry(args[1]), schemas);
    int n = Integer.parseInt(args[4]);
    String id = KafkaJob.enqueue(schemas, args[2], args[3], n, args[5], args[6],
        record -> Schemas.confluent(ids.get(record.getSchema().getFullName()), record));
    System.out.println(id);
  }

  /**
   * The registry's id of each schema the job is written with, by full name. The subject is the
   * record's full name (Confluent's RecordNameStrategy), so the payload's subject does not depend
   * on the topic it is sent to.
   */
  private static Map<String, Integer> register(Registry registry, Map<String, Schema> schemas)
      throws Exception {
    Map<String, Integer> ids = new HashMap<>();
    for (String name : List.of(KafkaJob.ENVELOPE, KafkaJob.PAYLOAD)) {
      ids.put(name, registry.register(name, schemas.get(name)));
    }
    return ids;
  }
}
