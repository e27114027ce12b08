#include "prometheus_scrape.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <sstream>

namespace sae::testing {

std::string HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  timeval timeout{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string response;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const std::string request = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if (send(fd, request.data(), request.size(), 0) == static_cast<ssize_t>(request.size())) {
      char buffer[4096];
      ssize_t n;
      while ((n = recv(fd, buffer, sizeof(buffer), 0)) > 0) response.append(buffer, static_cast<size_t>(n));
    }
  }
  close(fd);
  return response;
}

double Scrape::Get(const std::string& key) const {
  auto it = samples.find(key);
  EXPECT_NE(it, samples.end()) << "no sample " << key;
  return it == samples.end() ? -1 : it->second;
}

Scrape ParseScrape(const std::string& http) {
  Scrape scrape;
  const size_t body_start = http.find("\r\n\r\n");
  EXPECT_NE(body_start, std::string::npos) << http;
  EXPECT_EQ(http.rfind("HTTP/1.", 0), 0u) << http.substr(0, 100);
  EXPECT_NE(http.find(" 200 "), std::string::npos) << http.substr(0, 100);
  std::istringstream lines(http.substr(body_start + 4));
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty()) continue;
    if (line[0] == '#') {
      std::istringstream words(line);
      std::string hash, kind, name, rest;
      words >> hash >> kind >> name;
      std::getline(words, rest);
      if (kind == "TYPE") scrape.types[name] = rest.substr(1);
      if (kind == "HELP") scrape.help[name] = rest.substr(1);
      continue;
    }
    // The value follows the last space outside the label braces.
    const size_t close = line.rfind('}');
    const size_t space = line.find(' ', close == std::string::npos ? 0 : close);
    EXPECT_NE(space, std::string::npos) << line;
    if (space == std::string::npos) continue;
    char* end = nullptr;
    const std::string value = line.substr(space + 1);
    const double v = std::strtod(value.c_str(), &end);
    EXPECT_TRUE(end != value.c_str()) << "bad value in: " << line;
    scrape.samples[line.substr(0, space)] = v;
  }
  return scrape;
}

}  // namespace sae::testing
