// Reading a Prometheus endpoint in tests: one HTTP GET on loopback, and the
// text exposition format parsed into samples, types and help strings.
#ifndef SAE_TESTS_E2E_PROMETHEUS_SCRAPE_H_
#define SAE_TESTS_E2E_PROMETHEUS_SCRAPE_H_

#include <map>
#include <string>

namespace sae::testing {

// GET http://127.0.0.1:port/path; the whole response (headers and body), or
// "" when nothing answered.
std::string HttpGet(int port, const std::string& path);

// "name{labels} value" lines -> value; # HELP / # TYPE comments collected
// apart.
struct Scrape {
  std::map<std::string, double> samples;  // key: name{labels} as written
  std::map<std::string, std::string> types;
  std::map<std::string, std::string> help;

  // The sample's value; a test failure and -1 when it is absent.
  double Get(const std::string& key) const;
  bool Has(const std::string& key) const { return samples.count(key) > 0; }
};

// Parses an HTTP response holding the exposition format; a malformed line or
// a status other than 200 fails the test.
Scrape ParseScrape(const std::string& http);

}  // namespace sae::testing

#endif  // SAE_TESTS_E2E_PROMETHEUS_SCRAPE_H_
