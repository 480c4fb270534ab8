// Input of workload "g++" of suite alloc (compiled by Debian's g++ with -O1
// -S -o -, the assembly on stdout; never built by CMake): a few standard
// headers and enough template instantiations to keep the front end, the
// optimizer and the code generator busy. cc1plus allocates its trees in
// its own garbage-collected pages, but its passes still make hundreds of
// thousands of malloc calls.
#include <algorithm>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

struct Item {
  std::string name;
  std::vector<int> values;
  double score = 0;
};

std::map<std::string, std::vector<Item>> group(const std::vector<Item>& items) {
  std::map<std::string, std::vector<Item>> groups;
  for (const Item& item : items) groups[item.name.substr(0, 3)].push_back(item);
  for (auto& [key, list] : groups)
    std::sort(list.begin(), list.end(), [](const Item& a, const Item& b) { return a.score < b.score; });
  return groups;
}

std::unordered_map<std::string, std::set<int>> index(const std::vector<Item>& items) {
  std::unordered_map<std::string, std::set<int>> result;
  for (const Item& item : items) result[item.name].insert(item.values.begin(), item.values.end());
  return result;
}

std::string render(const std::map<std::string, std::vector<Item>>& groups) {
  std::ostringstream out;
  for (const auto& [key, list] : groups) out << key << ':' << list.size() << '\n';
  return out.str();
}

int main() {
  std::vector<Item> items;
  for (int i = 0; i < 100; ++i) items.push_back({"item" + std::to_string(i), {i, i * 2}, i * 0.5});
  std::function<size_t()> work = [&] { return render(group(items)).size() + index(items).size(); };
  return static_cast<int>(work());
}
