package bridge.interop;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;
import java.util.Map;
import org.apache.avro.Schema;

/**
 * The part of a Confluent-compatible schema registry's REST API a producer needs (Confluent's
 * own, or Apicurio's at /apis/ccompat/v7), over java.net.http: no io.confluent client needed.
 */
final class Registry {
  private static final String CONTENT_TYPE = "application/vnd.schemaregistry.v1+json";
  private static final Duration TIMEOUT = Duration.ofSeconds(10);
  private static final ObjectMapper JSON = new ObjectMapper();

  private final HttpClient http = HttpClient.newBuilder().connectTimeout(TIMEOUT).build();
  private final String baseUrl;

  /** `baseUrl` is the API's root, under which /subjects lives. */
  Registry(String baseUrl) {
    this.baseUrl = baseUrl.replaceAll("/+$", "");
  }

  /**
   * The id of `schema` under `subject`. Registering is idempotent: a schema the subject already
   * has keeps its id, so this is also how a producer looks its id up.
   */
  int register(String subject, Schema schema) throws IOException, InterruptedException {
    // Subjects here are Avro full names (letters, digits, _ and .), safe in a URL path as they are.
    URI uri = URI.create(baseUrl + "/subjects/" + subject + "/versions");
    String body = JSON.writeValueAsString(Map.of("schema", schema.toString()));
    HttpRequest request = HttpRequest.newBuilder(uri)
        .timeout(TIMEOUT)
        .header("Content-Type", CONTENT_TYPE)
        .POST(HttpRequest.BodyPublishers.ofString(body))
        .build();
    HttpResponse<String> response = http.send(request, HttpResponse.BodyHandlers.ofString());
    JsonNode id = response.statusCode() == 200 ? JSON.readTree(response.body()).get("id") : null;
    if (id == null || !id.canConvertToInt()) {
      // The registry's own message (e.g. 409, incompatible with the subject's latest version).
      throw new IOException(
          "POST " + uri + " answered " + response.statusCode() + ": " + response.body());
    }
    return id.intValue();
  }
}
