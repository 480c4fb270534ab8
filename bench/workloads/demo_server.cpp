// demo_server: a stand-in for a request-handling server, the bundled demo of
// scripts/demo. Worker threads parse synthetic HTTP requests into strings,
// vectors and maps, build a response in a temporary buffer and keep a small
// long-lived cache: the mix of hot short-lived and long-lived allocations
// hotpool is made to find. Prints a checksum so runs can be compared.
//
//   demo_server [requests per thread = 1000000] [threads = 2]
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

struct Header {
  std::string name;
  std::string value;
};

struct Request {
  std::string method, path;
  std::vector<Header> headers;
};

std::string make_request(unsigned id) {
  std::string text = "GET /api/items/" + std::to_string(id % 977) + " HTTP/1.1\r\n";
  text += "Host: example.test\r\nUser-Agent: demo/1.0\r\nAccept: */*\r\n";
  text += "X-Request-Id: " + std::to_string(id) + "\r\n\r\n";
  return text;
}

Request parse(const std::string& text) {
  Request request;
  size_t line_end = text.find("\r\n");
  const std::string first = text.substr(0, line_end);
  const size_t space = first.find(' ');
  request.method = first.substr(0, space);
  request.path = first.substr(space + 1, first.find(' ', space + 1) - space - 1);
  for (size_t start = line_end + 2; start < text.size();) {
    const size_t end = text.find("\r\n", start);
    if (end == start || end == std::string::npos) break;
    const size_t colon = text.find(':', start);
    request.headers.push_back({text.substr(start, colon - start), text.substr(colon + 2, end - colon - 2)});
    start = end + 2;
  }
  return request;
}

unsigned long handle(const Request& request, std::map<std::string, std::string>& cache) {
  auto body = std::make_unique<char[]>(1024);  // a temporary response buffer
  int length = std::snprintf(body.get(), 1024, "{\"path\":\"%s\",\"headers\":%zu}", request.path.c_str(),
                             request.headers.size());
  unsigned long sum = static_cast<unsigned long>(length);
  for (int i = 0; i < length; ++i) sum = sum * 31 + static_cast<unsigned char>(body[i]);
  if (cache.size() < 512) cache.emplace(request.path, std::string(body.get(), static_cast<size_t>(length)));
  return sum;
}

}  // namespace

int main(int argc, char** argv) {
  const unsigned requests = argc > 1 ? static_cast<unsigned>(std::atoi(argv[1])) : 1000000;
  const unsigned threads = argc > 2 ? static_cast<unsigned>(std::atoi(argv[2])) : 2;
  std::vector<unsigned long> sums(threads);
  std::vector<std::thread> workers;
  for (unsigned t = 0; t < threads; ++t) {
    workers.emplace_back([t, requests, &sums] {
      std::map<std::string, std::string> cache;
      unsigned long sum = 0;
      for (unsigned i = 0; i < requests; ++i) sum += handle(parse(make_request(t * requests + i)), cache);
      sums[t] = sum;
    });
  }
  for (auto& worker : workers) worker.join();
  unsigned long total = 0;
  for (unsigned long sum : sums) total ^= sum;
  std::printf("demo_server: %u requests on %u threads, checksum %lx\n", requests * threads, threads, total);
  return 0;
}
