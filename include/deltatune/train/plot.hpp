// A training run's curves as a PNG image: the loss over steps above, the dev metric below.
//
// Self-contained: a minimal PNG encoder (8-bit RGB, zlib stream of stored deflate blocks with
// its CRC-32 and Adler-32, so no compression library) and a rasteriser for lines and a 3x5
// pixel font of the characters numbers need. The axes carry their ranges as numbers; the image
// has no other text (loss in blue, metric in orange).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <deltatune/core/atomic_file.hpp>
#include <deltatune/core/error.hpp>
#include <deltatune/train/log.hpp>

namespace deltatune {

namespace detail {

inline uint32_t crc32(const std::string& bytes, std::size_t begin = 0) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[n] = c;
    }
    return t;
  }();
  uint32_t c = 0xFFFFFFFFu;
  for (std::size_t i = begin; i < bytes.size(); ++i) c = table[(c ^ static_cast<uint8_t>(bytes[i])) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

inline uint32_t adler32(const std::string& bytes) {
  uint32_t a = 1, b = 0;
  for (const char ch : bytes) {
    a = (a + static_cast<uint8_t>(ch)) % 65521;
    b = (b + a) % 65521;
  }
  return (b << 16) | a;
}

inline void put_u32_be(std::string& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<char>((v >> shift) & 0xFF));
}

// Appends a chunk: length, type, data, CRC-32 of type and data.
inline void put_png_chunk(std::string& out, const char* type, const std::string& data) {
  put_u32_be(out, static_cast<uint32_t>(data.size()));
  const std::string body = std::string(type, 4) + data;
  out += body;
  put_u32_be(out, crc32(body));
}

// A zlib stream of `raw` in stored (uncompressed) deflate blocks of at most 65535 bytes.
inline std::string zlib_stored(const std::string& raw) {
  std::string out = "\x78\x01";
  std::size_t pos = 0;
  do {
    const auto n = static_cast<uint16_t>(std::min<std::size_t>(65535, raw.size() - pos));
    const bool last = pos + n == raw.size();
    out.push_back(last ? 1 : 0);  // BFINAL, BTYPE 00 (stored)
    for (const uint16_t v : {n, static_cast<uint16_t>(~n)}) {
      out.push_back(static_cast<char>(v & 0xFF));  // LEN and NLEN are little-endian
      out.push_back(static_cast<char>(v >> 8));
    }
    out.append(raw, pos, n);
    pos += n;
  } while (pos < raw.size());
  put_u32_be(out, adler32(raw));
  return out;
}

}  // namespace detail

// An RGB image to draw on; (0, 0) is the top left.
struct Canvas {
  using Color = std::array<uint8_t, 3>;
  int width, height;
  std::vector<uint8_t> rgb;

  Canvas(int w, int h, Color background = {255, 255, 255}) : width(w), height(h), rgb(std::size_t(w) * h * 3) {
    for (std::size_t i = 0; i < rgb.size(); ++i) rgb[i] = background[i % 3];
  }

  void set(int x, int y, Color c) {
    if (x < 0 || y < 0 || x >= width || y >= height) return;
    std::copy(c.begin(), c.end(), rgb.begin() + (std::size_t(y) * width + x) * 3);
  }

  // A line `thickness` pixels wide (Bresenham with a square brush).
  void line(int x0, int y0, int x1, int y1, Color c, int thickness = 1) {
    const int dx = std::abs(x1 - x0), dy = -std::abs(y1 - y0), sx = x0 < x1 ? 1 : -1, sy = y0 < y1 ? 1 : -1;
    for (int err = dx + dy;;) {
      for (int i = 0; i < thickness; ++i)
        for (int j = 0; j < thickness; ++j) set(x0 + i - thickness / 2, y0 + j - thickness / 2, c);
      if (x0 == x1 && y0 == y1) return;
      const int e2 = 2 * err;
      if (e2 >= dy) err += dy, x0 += sx;
      if (e2 <= dx) err += dx, y0 += sy;
    }
  }

  // `text` of digits, '.', '-', '+' and 'e' in a 3x5 font, `scale` pixels a dot, top left at (x, y).
  void text(int x, int y, const std::string& text, Color c, int scale = 2) {
    for (const char ch : text) {
      const uint16_t glyph = glyph_bits(ch);
      for (int row = 0; row < 5; ++row)
        for (int col = 0; col < 3; ++col)
          if (glyph >> (14 - row * 3 - col) & 1)
            for (int i = 0; i < scale * scale; ++i) set(x + col * scale + i % scale, y + row * scale + i / scale, c);
      x += 4 * scale;
    }
  }

  // The image as PNG bytes (8-bit RGB, no filtering, stored deflate).
  std::string png() const {
    std::string raw;
    raw.reserve(std::size_t(height) * (width * 3 + 1));
    for (int y = 0; y < height; ++y) {
      raw.push_back(0);  // filter type None
      raw.append(reinterpret_cast<const char*>(rgb.data()) + std::size_t(y) * width * 3, std::size_t(width) * 3);
    }
    std::string header;
    detail::put_u32_be(header, static_cast<uint32_t>(width));
    detail::put_u32_be(header, static_cast<uint32_t>(height));
    header += std::string("\x08\x02\x00\x00\x00", 5);  // 8 bits, RGB, deflate, no filter, no interlace
    std::string out = "\x89PNG\r\n\x1a\n";
    detail::put_png_chunk(out, "IHDR", header);
    detail::put_png_chunk(out, "IDAT", detail::zlib_stored(raw));
    detail::put_png_chunk(out, "IEND", "");
    return out;
  }

 private:
  // Rows of 3 bits, top row in the high bits; unknown characters draw nothing.
  static uint16_t glyph_bits(char ch) {
    static const char* digits[] = {"111101101101111", "010110010010111", "111001111100111", "111001111001111",
                                   "101101111001001", "111100111001111", "111100111101111", "111001001001001",
                                   "111101111101111", "111101111001111"};
    const char* rows = ch >= '0' && ch <= '9' ? digits[ch - '0']
                       : ch == '.'            ? "000000000000010"
                       : ch == '-'            ? "000000111000000"
                       : ch == '+'            ? "000010111010000"
                       : ch == 'e'            ? "000111111100111"
                                              : "000000000000000";
    uint16_t bits = 0;
    for (int i = 0; i < 15; ++i) bits = static_cast<uint16_t>(bits << 1 | (rows[i] == '1'));
    return bits;
  }
};

// Points of one curve.
struct Curve {
  std::vector<double> x, y;
};

namespace detail {

// Draws `curve` in the box (left, top, width, height) with a frame and its x and y ranges as numbers.
inline void plot_panel(Canvas& canvas, const Curve& curve, int left, int top, int width, int height, Canvas::Color color) {
  const Canvas::Color grey{120, 120, 120};
  canvas.line(left, top, left, top + height, grey);
  canvas.line(left, top + height, left + width, top + height, grey);
  std::vector<std::size_t> finite;
  for (std::size_t i = 0; i < curve.x.size() && i < curve.y.size(); ++i)
    if (std::isfinite(curve.x[i]) && std::isfinite(curve.y[i])) finite.push_back(i);
  if (finite.empty()) return;
  double x_lo = curve.x[finite[0]], x_hi = x_lo, y_lo = curve.y[finite[0]], y_hi = y_lo;
  for (const auto i : finite) {
    x_lo = std::min(x_lo, curve.x[i]), x_hi = std::max(x_hi, curve.x[i]);
    y_lo = std::min(y_lo, curve.y[i]), y_hi = std::max(y_hi, curve.y[i]);
  }
  const auto px = [&](double x) { return left + int(std::lround((x - x_lo) / std::max(x_hi - x_lo, 1e-300) * width)); };
  const auto py = [&](double y) { return top + height - int(std::lround((y - y_lo) / std::max(y_hi - y_lo, 1e-300) * height)); };
  for (std::size_t k = 0; k < finite.size(); ++k) {
    const auto a = finite[k == 0 ? 0 : k - 1], b = finite[k];
    canvas.line(px(curve.x[a]), py(curve.y[a]), px(curve.x[b]), py(curve.y[b]), color, 2);
  }
  canvas.text(4, top, fmt::format("{:.4g}", y_hi), grey);
  canvas.text(4, top + height - 10, fmt::format("{:.4g}", y_lo), grey);
  canvas.text(left, top + height + 6, fmt::format("{:.6g}", x_lo), grey);
  canvas.text(left + width - 60, top + height + 6, fmt::format("{:.6g}", x_hi), grey);
}

}  // namespace detail

// Writes (atomically) a PNG of the training loss over steps (top, blue) and the dev metric over
// steps (bottom, orange). Non-finite points are left out.
//   deltatune::write_training_plot("out/curves.png", {steps, losses}, {eval_steps, scores});
inline void write_training_plot(const std::string& path, const Curve& loss, const Curve& metric, int width = 800,
                                int height = 600) {
  detail::check<OptionError>(width >= 200 && height >= 200, "write_training_plot: {}x{} is too small; give at "
                             "least 200x200 pixels", width, height);
  Canvas canvas(width, height);
  const int left = 80, panel_w = width - left - 20, panel_h = height / 2 - 50;
  detail::plot_panel(canvas, loss, left, 20, panel_w, panel_h, {31, 119, 180});
  detail::plot_panel(canvas, metric, left, height / 2 + 20, panel_w, panel_h, {255, 127, 14});
  detail::write_text_atomically(path, canvas.png(), "write_training_plot");
}

}  // namespace deltatune
