-- The read functions (FORMAT.md, "Reading with Redis Functions"): any
-- mirrored key as the JSON text `edgecache get` prints, byte for byte.
-- The agent prepends the shebang line and NAMESPACE and PREFIXES (its
-- topics' key prefixes and store formats) and loads this with FUNCTION LOAD
-- REPLACE (src/functions.rs).
--
-- Lua 5.1 numbers are doubles: 64-bit integers are turned into decimal
-- text from their varint bytes, never through a number, and floats are
-- printed the way serde_json prints them (FORMAT.md, "The JSON edgecache
-- get prints"): the shortest digits that read back as the same double,
-- found with printf and strtod, laid out as serde_json lays them out.

local function boot()
  local sbyte, ssub, schar, sformat, sfind, sgsub, srep, smatch =
    string.byte, string.sub, string.char, string.format, string.find, string.gsub, string.rep, string.match
  local tconcat, floor, huge = table.concat, math.floor, math.huge

  local MAGIC = 236
  local MAX_DEPTH = 64 -- codec::MAX_DEPTH
  local JSON_MAX_LEVELS = 128 -- serde_json's recursion limit: the 128th open bracket fails
  local MAX_FIELDS, MAX_FIELD_NAME = 1024, 64
  local FIELDS_KEY = NAMESPACE .. ':fields'
  local MARKER_KEY = NAMESPACE .. ':marker'
  -- 10^s is exact in a double for s <= 15, as in codec::decimal_to_f64.
  local POW10 = {}
  for s = 0, 15 do POW10[s] = tonumber('1e' .. s) end

  -- Redis 7.0 hands pcall every error as a string, tables included, so
  -- the documented error is kept here and the wrapper returns it.
  local failure
  local function raise(code, text)
    failure = code .. ' ' .. text
    error(failure)
  end

  -- ------------------------------------------------------------ JSON text

  local ESCAPE = {['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f',
    ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t'}
  for i = 0, 31 do
    local c = schar(i)
    if not ESCAPE[c] then ESCAPE[c] = sformat('\\u%04x', i) end
  end

  -- A JSON string literal, escaped as serde_json escapes (DEL and non-ASCII
  -- stay as they are).
  local function quote(s)
    if not sfind(s, '[%z\1-\31"\\]') then return '"' .. s .. '"' end
    return '"' .. (sgsub(s, '[%z\1-\31"\\]', ESCAPE)) .. '"'
  end

  -- Object keys as `"name":`, remembered: every record repeats them. The
  -- memo is emptied when it reaches MEMO_MAX entries, bounding its memory.
  local MEMO_MAX = 4096
  local key_memo, n_key_memo = {}, 0
  local function key_text(name)
    local text = key_memo[name]
    if not text then
      if n_key_memo >= MEMO_MAX then key_memo, n_key_memo = {}, 0 end
      text = quote(name) .. ':'
      key_memo[name] = text
      n_key_memo = n_key_memo + 1
    end
    return text
  end

  local HEX = {}
  for i = 0, 255 do HEX[schar(i)] = sformat('%02x', i) end
  local function hex(s)
    return (sgsub(s, '.', HEX))
  end

  -- Length of the UTF-8 sequence starting at byte i (Unicode table 3-7), or
  -- nil and the length of its longest valid prefix (at least 1): what Rust's
  -- str::from_utf8 accepts and String::from_utf8_lossy replaces.
  local function utf8_seq(s, i)
    local b = sbyte(s, i)
    if b < 0x80 then return 1 end
    local n, lo, hi
    if b >= 0xC2 and b <= 0xDF then n, lo, hi = 2, 0x80, 0xBF
    elseif b == 0xE0 then n, lo, hi = 3, 0xA0, 0xBF
    elseif b == 0xED then n, lo, hi = 3, 0x80, 0x9F
    elseif b >= 0xE1 and b <= 0xEF then n, lo, hi = 3, 0x80, 0xBF
    elseif b == 0xF0 then n, lo, hi = 4, 0x90, 0xBF
    elseif b >= 0xF1 and b <= 0xF3 then n, lo, hi = 4, 0x80, 0xBF
    elseif b == 0xF4 then n, lo, hi = 4, 0x80, 0x8F
    else return nil, 1 end
    for j = 1, n - 1 do
      local c = sbyte(s, i + j)
      if not c or c < lo or c > hi then return nil, j end
      lo, hi = 0x80, 0xBF
    end
    return n
  end

  local function utf8_valid(s)
    if not sfind(s, '[\128-\255]') then return true end
    local i, n = 1, #s
    while i <= n do
      local len = utf8_seq(s, i)
      if not len then return false end
      i = i + len
    end
    return true
  end

  local function utf8_lossy(s)
    if utf8_valid(s) then return s end
    local out, i, n = {}, 1, #s
    while i <= n do
      local len, bad = utf8_seq(s, i)
      if len then
        out[#out + 1] = ssub(s, i, i + len - 1)
        i = i + len
      else
        out[#out + 1] = '\239\191\189' -- U+FFFD
        i = i + bad
      end
    end
    return tconcat(out)
  end

  -- Digits d (first one nonzero) and exponent e of d[1].d[2..] x 10^e, one
  -- unit of the last digit up or down.
  local function step(d, e, up)
    local p, t = #d, {sbyte(d, 1, -1)}
    local i = p
    if up then
      while i >= 1 and t[i] == 57 do t[i] = 48; i = i - 1 end
      if i == 0 then return '1' .. srep('0', p - 1), e + 1 end
      t[i] = t[i] + 1
    else
      while t[i] == 48 do t[i] = 57; i = i - 1 end
      t[i] = t[i] - 1
      if t[1] == 48 then return srep('9', p), e - 1 end
    end
    return schar(unpack(t)), e
  end

  local function reads_back(d, e, x)
    return tonumber(d .. 'e' .. (e - #d + 1)) == x
  end

  -- The shortest digits that read back as x (x finite, > 0), the closest to
  -- x among them, as serde_json finds them. printf's p-digit rounding is the
  -- closest p-digit decimal; when it falls just outside x's rounding
  -- interval, its neighbour on the other side of x may be inside.
  local function shortest(x, p)
    local s = sformat('%.' .. (p - 1) .. 'e', x)
    local m, e = smatch(s, '^([%d.]+)e([-+]%d+)$')
    local d = sgsub(m, '%.', '')
    e = tonumber(e)
    local y = tonumber(s)
    if y == x then return d, e end
    if p < 17 then
      local d2, e2 = step(d, e, y < x)
      if reads_back(d2, e2, x) then return d2, e2 end
    end
  end

  local MIN_NORMAL = 2.2250738585072014e-308

  -- Digits d (no trailing zeros) and exponent e of d[1].d[2..] x 10^e in
  -- the layout of serde_json's float printer (zmij): plain notation for
  -- decimal exponents -5..=15, else d.ddde+N / d.ddde-N.
  local function layout(neg, d, e)
    local n = #d
    local s
    if e >= -5 and e <= 15 then
      if n - 1 <= e then
        s = d .. srep('0', e - n + 1) .. '.0'
      elseif e >= 0 then
        s = ssub(d, 1, e + 1) .. '.' .. ssub(d, e + 2)
      else
        s = '0.' .. srep('0', -e - 1) .. d
      end
    else
      s = ssub(d, 1, 1) .. (n > 1 and ('.' .. ssub(d, 2)) or '') ..
        (e >= 0 and 'e+' or 'e-') .. sformat('%d', e >= 0 and e or -e)
    end
    return neg and ('-' .. s) or s
  end

  local float_memo, n_float_memo = {}, 0

  local function float_text_uncached(x)
    local neg = x < 0
    if neg then x = -x end
    local d, e
    if x >= MIN_NORMAL then
      -- A normal double's rounding interval is narrower than the spacing of
      -- 15-digit decimals, so it holds at most one of them: if it holds
      -- one, that one without its trailing zeros is the shortest.
      d, e = shortest(x, 15)
      if not d then d, e = shortest(x, 16) end
      if not d then d, e = shortest(x, 17) end
    else
      -- Subnormals have wide intervals: try every length.
      for p = 1, 17 do
        d, e = shortest(x, p)
        if d then break end
      end
    end
    return layout(neg, (sgsub(d, '0+$', '')), e)
  end

  -- Device states repeat their numbers: each double's text is remembered
  -- (zeros and NaN are not table keys that work; they are cheap anyway).
  local function float_text(x)
    if x ~= x or x == huge or x == -huge then return 'null' end
    if x == 0 then return (1 / x < 0) and '-0.0' or '0.0' end
    local text = float_memo[x]
    if not text then
      if n_float_memo >= MEMO_MAX then float_memo, n_float_memo = {}, 0 end
      text = float_text_uncached(x)
      float_memo[x] = text
      n_float_memo = n_float_memo + 1
    end
    return text
  end

  -- The text of the double nearest to the decimal digits x 10^scale10
  -- (digits without sign, leading zeros allowed), when that decimal has at
  -- most 15 significant digits and the double x is normal: the decimal
  -- reads back as x, and (as above) no other decimal of 15 digits or fewer
  -- does, so its digits are x's shortest. Saves printf and strtod on
  -- Decimals and on JSON's short numbers. nil when it does not apply.
  local function short_decimal_text(neg, digits, scale10, x)
    if x ~= x or x < MIN_NORMAL or x == huge then return nil end
    local lead = sfind(digits, '[1-9]')
    if not lead then return nil end
    local last = sfind(digits, '0*$') - 1
    if last - lead + 1 > 15 then return nil end
    return layout(neg, ssub(digits, lead, last), #digits - lead + scale10)
  end
  -- ------------------------------------------------------- postcard values

  -- The value being decoded: bytes, next position, length, and whether
  -- keys are inline (format 1).
  local S, P, N, V1
  -- The field table of NAMESPACE, cached while the marker stays the same:
  -- under one marker a number never changes its name (FORMAT.md).
  local cached_marker, cached_names = false, {}
  local checked_this_call, reloaded_this_call

  local function corrupt(detail)
    raise('EDGECACHE_CORRUPT', 'the value is not valid postcard data: ' .. detail)
  end

  local function load_fields()
    local flat = redis.call('HGETALL', FIELDS_KEY)
    local names = {}
    for i = 1, #flat, 2 do
      local number, name = flat[i], flat[i + 1]
      -- As codec::Fields::from_pairs: u32 in decimal (Rust allows a '+'),
      -- below MAX_FIELDS, names of at most MAX_FIELD_NAME bytes.
      if sfind(number, '^%+?%d+$') then
        local id = tonumber(number)
        if id < MAX_FIELDS and #name <= MAX_FIELD_NAME then names[id] = name end
      end
    end
    return names
  end

  local function field_name(id)
    if not checked_this_call then
      checked_this_call = true
      local marker = redis.call('GET', MARKER_KEY)
      if not marker or marker ~= cached_marker then
        cached_names = load_fields()
        cached_marker = marker
        reloaded_this_call = true
      end
    end
    local name = cached_names[id]
    if not name and not reloaded_this_call then
      -- A name added since the cache was filled: the table only grows.
      reloaded_this_call = true
      cached_names = load_fields()
      name = cached_names[id]
    end
    if not name then
      raise('EDGECACHE_CORRUPT', sformat('the value is not valid postcard data: field number %.0f is not in the field table (%s)', id, FIELDS_KEY))
    end
    return name
  end

  local function byte()
    local b = sbyte(S, P)
    if not b then corrupt('length beyond the end') end
    P = P + 1
    return b
  end

  -- An unsigned LEB128 varint of at most max_bytes bytes whose last byte
  -- holds at most last_max (postcard: u64 10 and 1, u32 5 and 15), as a
  -- double (exact below 2^53, which is all lengths and tags can be).
  local function varint(max_bytes, last_max)
    local b = sbyte(S, P)
    if b and b < 128 then
      P = P + 1
      return b
    end
    local n, mul = 0, 1
    for i = 1, max_bytes do
      local b = byte()
      local bits = b % 128
      if i == max_bytes and (b >= 128 or bits > last_max) then break end
      n = n + bits * mul
      if b < 128 then return n end
      mul = mul * 128
    end
    corrupt('bad varint')
  end

  local function u64() return varint(10, 1) end
  local function tag() if V1 then return varint(5, 15) end return u64() end

  -- A zigzag i64 varint as exact decimal text.
  local function i64_text()
    local from = P
    local u = u64()
    if P - from <= 6 then
      -- At most 42 bits: exact as a double, and printed in full by
      -- tostring (%.14g).
      if u % 2 == 0 then return tostring(u / 2) end
      return tostring(-(u + 1) / 2)
    elseif P - from == 7 then
      if u % 2 == 0 then return sformat('%.0f', u / 2) end
      return sformat('%.0f', -(u + 1) / 2)
    end
    -- Base 10^7 limbs, least significant first, filled from the most
    -- significant 7-bit group down.
    local limbs = {0}
    for i = P - 1, from, -1 do
      local carry = sbyte(S, i) % 128
      for j = 1, #limbs do
        local v = limbs[j] * 128 + carry
        carry = floor(v / 1e7)
        limbs[j] = v - carry * 1e7
      end
      if carry > 0 then limbs[#limbs + 1] = carry end
    end
    local negative = limbs[1] % 2 == 1
    if negative then
      -- -(u + 1) / 2
      local j = 1
      while true do
        local v = (limbs[j] or 0) + 1
        if v < 1e7 then limbs[j] = v; break end
        limbs[j] = 0
        j = j + 1
      end
    end
    local r = 0
    for j = #limbs, 1, -1 do
      local v = r * 1e7 + limbs[j]
      limbs[j] = floor(v / 2)
      r = v % 2
    end
    local top = #limbs
    while top > 1 and limbs[top] == 0 do top = top - 1 end
    local parts = {negative and '-' or '', sformat('%d', limbs[top])}
    for j = top - 1, 1, -1 do parts[#parts + 1] = sformat('%07d', limbs[j]) end
    return tconcat(parts)
  end

  local function take(n)
    if n > N - P + 1 then corrupt('length beyond the end') end
    local s = ssub(S, P, P + n - 1)
    P = P + n
    return s
  end

  local function utf8_string()
    local s = take(u64())
    if not utf8_valid(s) then corrupt('string is not UTF-8') end
    return s
  end

  local function count()
    local n = u64()
    if n > N - P + 1 then corrupt(sformat('count %.0f beyond the end', n)) end
    return n
  end

  -- One JSON object from entries in input order: a repeated key keeps its
  -- first place and takes its last value, as serde_json's map does.
  local function object(keys, values, n)
    local at, order = {}, {}
    for i = 1, n do
      local key = keys[i]
      local j = at[key]
      if j then
        order[j] = key_text(key) .. values[i]
      else
        order[#order + 1] = key_text(key) .. values[i]
        at[key] = #order
      end
    end
    return '{' .. tconcat(order, ',') .. '}'
  end

  -- The text of a zigzag varint of one byte (-64..63).
  local SMALL_INT = {}
  for b = 0, 127 do
    SMALL_INT[b] = sformat('%d', b % 2 == 0 and b / 2 or -(b + 1) / 2)
  end

  local function value(depth)
    if depth > MAX_DEPTH then corrupt('nesting deeper than 64 levels') end
    -- Tags, small integers and field references are one byte: read inline,
    -- since every interpreted call costs (BENCHMARKS.md, "Read cost").
    local t = sbyte(S, P)
    if t and t < 128 then P = P + 1 else t = tag() end
    if t == 0 then return 'null'
    elseif t == 1 then
      local b = byte()
      if b == 0 then return 'false' elseif b == 1 then return 'true' end
      corrupt('bool byte ' .. b)
    elseif t == 2 then
      local b = sbyte(S, P)
      if b and b < 128 then
        P = P + 1
        return SMALL_INT[b]
      end
      return i64_text()
    elseif t == 3 then return float_text((struct.unpack('<d', take(8))))
    elseif t == 4 then
      -- Short ASCII text needing no escapes, the usual string: one match.
      local len = sbyte(S, P)
      if len and len < 128 and P + len <= N then
        local text = ssub(S, P + 1, P + len)
        if not sfind(text, '[%z\1-\31"\\\128-\255]') then
          P = P + 1 + len
          return '"' .. text .. '"'
        end
      end
      return quote(utf8_string())
    elseif t == 5 then return '"' .. hex(take(u64())) .. '"'
    elseif t == 6 then
      local n = count()
      local items = {}
      for i = 1, n do items[i] = value(depth + 1) end
      return '[' .. tconcat(items, ',') .. ']'
    elseif t == 7 then
      local n = count()
      -- `"key":value` per entry; a repeated key keeps its first place and
      -- takes its last value, as serde_json's map does.
      local parts, at = {}, {}
      for i = 1, n do
        local key
        if V1 then
          key = utf8_string()
        else
          local r = sbyte(S, P)
          if r and r < 128 then P = P + 1 else r = u64() end
          key = r == 0 and utf8_string() or field_name(r - 1)
        end
        local text = key_text(key) .. value(depth + 1)
        local j = at[key]
        if j then
          parts[j] = text
        else
          j = #parts + 1
          parts[j] = text
          at[key] = j
        end
      end
      return '{' .. tconcat(parts, ',') .. '}'
    elseif t == 8 then
      local from = P
      local u = u64()
      local scale = byte()
      if scale > 15 then scale = 15 end
      if P - from > 8 then
        -- A mantissa of 2^49 or more: through its exact text, which strtod
        -- rounds as `as f64` does.
        P = from
        local mantissa = tonumber(i64_text())
        P = P + 1 -- the scale, read above
        return float_text(mantissa / POW10[scale])
      end
      -- Exact below 2^53; 10^scale is exact and the division correctly
      -- rounded, so x is the double nearest to the decimal.
      local mantissa = u % 2 == 0 and u / 2 or -(u + 1) / 2
      local x = mantissa / POW10[scale]
      local text = x ~= 0 and float_memo[x]
      if text then return text end
      local neg = mantissa < 0
      local digits = sformat('%.0f', neg and -mantissa or mantissa)
      text = #digits <= 15 and short_decimal_text(neg, digits, -scale, neg and -x or x)
      if not text then return float_text(x) end
      if n_float_memo >= MEMO_MAX then float_memo, n_float_memo = {}, 0 end
      float_memo[x] = text
      n_float_memo = n_float_memo + 1
      return text
    end
    corrupt(sformat('unknown tag %.0f', t))
  end

  -- JSON text and record timestamp (decimal text, or nil) of a stored value.
  local function postcard(bytes)
    S, P, N = bytes, 3, #bytes
    checked_this_call, reloaded_this_call = false, false
    local b0, version = sbyte(bytes, 1, 2)
    if b0 ~= MAGIC then
      raise('EDGECACHE_CORRUPT', 'the value is not valid postcard data: not an edgecache stored value (bad magic byte)')
    end
    if version ~= 1 and version ~= 2 then
      raise('EDGECACHE_CORRUPT', sformat('the value is not valid postcard data: stored format version %d is newer than this library understands', version or 0))
    end
    V1 = version == 1
    -- Format 1 is postcard's own encoding: the option is one byte and bytes
    -- after the value are ignored; format 2's option is a varint and nothing
    -- may follow.
    local option = V1 and byte() or u64()
    local ts
    if option == 1 then ts = i64_text()
    elseif option ~= 0 then corrupt('timestamp option ' .. option) end
    local json = value(0)
    if not V1 and P <= N then corrupt((N - P + 1) .. ' bytes after the value') end
    return json, ts
  end

  -- ----------------------------------------------------------- JSON input

  -- Parses JSON as serde_json does (RFC 8259, UTF-8, no lone surrogates,
  -- 127 levels at most) and prints it as serde_json prints a
  -- serde_json::Value: numbers as u64, i64 or f64, strings re-escaped.
  local J, JP
  local json_failed

  local function jfail()
    json_failed = true
    error('not JSON')
  end

  local function ws()
    -- Compact JSON (the json store) has none: one byte test, no search.
    local b = sbyte(J, JP)
    if b == 32 or b == 9 or b == 10 or b == 13 then
      JP = sfind(J, '[^ \t\n\r]', JP) or (#J + 1)
    end
  end

  local function utf8_char(c)
    if c < 0x80 then return schar(c) end
    if c < 0x800 then return schar(0xC0 + floor(c / 64), 0x80 + c % 64) end
    if c < 0x10000 then
      return schar(0xE0 + floor(c / 4096), 0x80 + floor(c / 64) % 64, 0x80 + c % 64)
    end
    return schar(0xF0 + floor(c / 262144), 0x80 + floor(c / 4096) % 64,
      0x80 + floor(c / 64) % 64, 0x80 + c % 64)
  end

  local SIMPLE_ESCAPES = {['"'] = '"', ['\\'] = '\\', ['/'] = '/', b = '\b',
    f = '\f', n = '\n', r = '\r', t = '\t'}

  local function hex4()
    local h = smatch(J, '^%x%x%x%x', JP)
    if not h then jfail() end
    JP = JP + 4
    return tonumber(h, 16)
  end

  local function jstring()
    JP = JP + 1
    local parts = {}
    while true do
      local at = sfind(J, '[%z\1-\31"\\]', JP)
      if not at then jfail() end
      parts[#parts + 1] = ssub(J, JP, at - 1)
      local c = ssub(J, at, at)
      JP = at + 1
      if c == '"' then break end
      if c ~= '\\' then jfail() end -- a control character
      local e = ssub(J, JP, JP)
      JP = JP + 1
      if SIMPLE_ESCAPES[e] then
        parts[#parts + 1] = SIMPLE_ESCAPES[e]
      elseif e == 'u' then
        local n = hex4()
        if n >= 0xDC00 and n <= 0xDFFF then jfail() end
        if n >= 0xD800 and n <= 0xDBFF then
          if ssub(J, JP, JP + 1) ~= '\\u' then jfail() end
          JP = JP + 2
          local n2 = hex4()
          if n2 < 0xDC00 or n2 > 0xDFFF then jfail() end
          n = 0x10000 + (n - 0xD800) * 1024 + (n2 - 0xDC00)
        end
        parts[#parts + 1] = utf8_char(n)
      else
        jfail()
      end
    end
    local s = tconcat(parts)
    if not utf8_valid(s) then jfail() end
    return s
  end

  local U64_MAX, I64_MIN_ABS = '18446744073709551615', '9223372036854775808'

  local function not_above(digits, limit)
    return #digits < #limit or (#digits == #limit and digits <= limit)
  end

  local function jnumber()
    local from = JP
    local neg = ssub(J, JP, JP) == '-'
    if neg then JP = JP + 1 end
    local int = smatch(J, '^%d+', JP)
    if not int then jfail() end
    if #int > 1 and sbyte(int, 1) == 48 then jfail() end
    JP = JP + #int
    local is_float = false
    if ssub(J, JP, JP) == '.' then
      local frac = smatch(J, '^%.%d+', JP)
      if not frac then jfail() end
      JP = JP + #frac
      is_float = true
    end
    local c = ssub(J, JP, JP)
    if c == 'e' or c == 'E' then
      local exp = smatch(J, '^[eE][-+]?%d+', JP)
      if not exp then jfail() end
      JP = JP + #exp
      is_float = true
    end
    local text = ssub(J, from, JP - 1)
    if not is_float then
      if not neg and not_above(int, U64_MAX) then return text end
      if neg and int ~= '0' and not_above(int, I64_MIN_ABS) then return text end
    end
    local x = tonumber(text)
    if x == huge or x == -huge then jfail() end -- serde_json: out of range
    if #text <= 24 then
      -- strtod rounds correctly: x is the double nearest to the decimal.
      local frac = smatch(text, '^-?%d+%.(%d+)') or ''
      local exp = smatch(text, '[eE]([-+]?%d+)$')
      local short = short_decimal_text(neg, int .. frac, (exp and tonumber(exp) or 0) - #frac, neg and -x or x)
      if short then return short end
    end
    return float_text(x)
  end

  local jvalue

  local function jliteral(word, out)
    if ssub(J, JP, JP + #word - 1) ~= word then jfail() end
    JP = JP + #word
    return out
  end

  function jvalue(levels)
    local c = ssub(J, JP, JP)
    if c == '"' then
      -- A string of ASCII needing no escapes, the usual one: one match.
      local _, stop = sfind(J, '^"[^%z\1-\31"\\\128-\255]*"', JP)
      if stop then
        local text = ssub(J, JP, stop)
        JP = stop + 1
        return text
      end
      return quote(jstring())
    elseif c == '{' then
      if levels + 1 >= JSON_MAX_LEVELS then jfail() end
      JP = JP + 1
      ws()
      if ssub(J, JP, JP) == '}' then JP = JP + 1; return '{}' end
      local keys, values, n = {}, {}, 0
      while true do
        if ssub(J, JP, JP) ~= '"' then jfail() end
        n = n + 1
        keys[n] = jstring()
        ws()
        if ssub(J, JP, JP) ~= ':' then jfail() end
        JP = JP + 1
        ws()
        values[n] = jvalue(levels + 1)
        ws()
        c = ssub(J, JP, JP)
        JP = JP + 1
        if c == '}' then break end
        if c ~= ',' then jfail() end
        ws()
      end
      return object(keys, values, n)
    elseif c == '[' then
      if levels + 1 >= JSON_MAX_LEVELS then jfail() end
      JP = JP + 1
      ws()
      if ssub(J, JP, JP) == ']' then JP = JP + 1; return '[]' end
      local items = {}
      while true do
        items[#items + 1] = jvalue(levels + 1)
        ws()
        c = ssub(J, JP, JP)
        JP = JP + 1
        if c == ']' then break end
        if c ~= ',' then jfail() end
        ws()
      end
      return '[' .. tconcat(items, ',') .. ']'
    elseif c == 'n' then return jliteral('null', 'null')
    elseif c == 't' then return jliteral('true', 'true')
    elseif c == 'f' then return jliteral('false', 'false')
    elseif c == '-' or sfind(c, '^%d') then return jnumber()
    end
    jfail()
  end

  -- The JSON text of a whole document, or nil if it is not JSON.
  local function json_document(text)
    J, JP, json_failed = text, 1, false
    local ok, out = pcall(function()
      ws()
      local v = jvalue(0)
      ws()
      if JP <= #J then jfail() end
      return v
    end)
    if ok then return out end
    if not json_failed then error(out) end
    return nil
  end

  -- ---------------------------------------------------------- entry points

  local function store_of(key)
    for i = 1, #PREFIXES do
      local prefix = PREFIXES[i][1]
      if ssub(key, 1, #prefix) == prefix then return PREFIXES[i][2] end
    end
  end

  -- The store format, JSON text and timestamp text (or nil) of a key; raises
  -- the documented errors.
  local function render(store, bytes)
    if store == 'postcard' then return postcard(bytes) end
    local json = json_document(bytes)
    if json then return json end
    if store == 'json' then
      raise('EDGECACHE_CORRUPT', 'the value is not valid json data')
    end
    -- Raw values that are not JSON print as a string (text) or hex (binary).
    if utf8_valid(bytes) then return quote(bytes) end
    return '"' .. hex(bytes) .. '"'
  end

  -- Apps read a value many times between updates: the JSON text of recent
  -- values (stored values of up to VALUE_MEMO_BYTES, VALUE_MEMO_MAX of them,
  -- a few MB of Lua memory at most) is kept by store and stored bytes (for
  -- a hash, the string hash_fields makes of its fields). A
  -- postcard text depends on the field table too, which is stable under
  -- one marker: a new marker empties the memo.
  local VALUE_MEMO_MAX, VALUE_MEMO_BYTES = 2048, 512
  local value_memo, n_value_memo, memo_marker = {}, 0, false

  -- The hash store (FORMAT.md, "The hash store"): a field's text is JSON
  -- when it starts as JSON text does or is a JSON word, a string otherwise
  -- (codec::hash_text_is_json).
  local JSON_START = {['"'] = true, ['{'] = true, ['['] = true, ['-'] = true,
    ['true'] = true, ['false'] = true, ['null'] = true}
  for d = 0, 9 do JSON_START[tostring(d)] = true end
  local function hash_corrupt(detail)
    raise('EDGECACHE_CORRUPT', 'the value is not valid hash data: ' .. detail)
  end
  -- A hash store key's HGETALL reply, and one string that stands for it
  -- (each part with its length before it), to key the memo below by.
  local function hash_fields(key)
    local flat = redis.pcall('HGETALL', key)
    if flat.err then
      if sfind(flat.err, 'WRONGTYPE', 1, true) then
        hash_corrupt('the key holds another Redis type')
      end
      error(flat.err)
    end
    if #flat == 0 then raise('EDGECACHE_NOT_FOUND', 'key not found') end
    local parts = {}
    for i = 1, #flat do parts[i] = #flat[i] .. ':' .. flat[i] end
    return flat, tconcat(parts)
  end
  -- The JSON object of a hash store key, fields in HGETALL order.
  local function hash_object(flat)
    local out = {}
    for i = 1, #flat, 2 do
      local name, text = flat[i], flat[i + 1]
      if not utf8_valid(name) then hash_corrupt('a field name is not valid UTF-8') end
      local json
      if JSON_START[ssub(text, 1, 1)] or JSON_START[text] then
        json = json_document(text)
        if not json then hash_corrupt('field ' .. quote(name) .. ' is not valid JSON') end
      elseif utf8_valid(text) then
        json = quote(text)
      else
        hash_corrupt('field ' .. quote(name) .. ' is not valid UTF-8')
      end
      out[#out + 1] = key_text(name) .. json
    end
    return '{' .. tconcat(out, ',') .. '}'
  end

  local function read(key)
    local store = store_of(key)
    if not store then
      raise('EDGECACHE_NO_PREFIX', 'no configured key_prefix matches this key')
    end
    local bytes, flat
    if store == 'hash' then
      flat, bytes = hash_fields(key)
    else
      bytes = redis.pcall('GET', key)
      if type(bytes) == 'table' and bytes.err then
        if sfind(bytes.err, 'WRONGTYPE', 1, true) then
          raise('EDGECACHE_CORRUPT', 'the value is not valid ' .. store .. ' data: the key holds another Redis type')
        end
        error(bytes.err)
      end
      if not bytes then raise('EDGECACHE_NOT_FOUND', 'key not found') end
    end
    local function render_it()
      if flat then return hash_object(flat) end
      return render(store, bytes)
    end
    if #bytes > VALUE_MEMO_BYTES then return store, render_it() end
    if store == 'postcard' then
      local marker = redis.call('GET', MARKER_KEY)
      -- No marker, no agent keeping the table stable: no memo.
      if not marker then return store, render(store, bytes) end
      if marker ~= memo_marker then
        value_memo, n_value_memo, memo_marker = {}, 0, marker
      end
    end
    local memo = value_memo[store]
    if not memo then
      memo = {}
      value_memo[store] = memo
    end
    local hit = memo[bytes]
    if hit then return store, hit[1], hit[2] end
    local json, ts = render_it()
    if n_value_memo >= VALUE_MEMO_MAX then
      value_memo, n_value_memo = {[store] = {}}, 0
      memo = value_memo[store]
    end
    memo[bytes] = {json, ts}
    n_value_memo = n_value_memo + 1
    return store, json, ts
  end

  local function one_key(keys, name)
    if #keys ~= 1 then
      raise('ERR', name .. ' takes exactly one key')
    end
    return keys[1]
  end

  local api = {
    get = function(keys)
      local _, json = read(one_key(keys, 'edgecache_get'))
      return json
    end,
    mget = function(keys)
      local out = {}
      for i = 1, #keys do
        failure = nil
        local ok, store, json = pcall(read, keys[i])
        if ok then
          out[i] = json
        elseif not failure then
          error(store)
        elseif sfind(failure, 'EDGECACHE_NOT_FOUND', 1, true) == 1 then
          out[i] = false -- a nil reply, as MGET gives
        else
          out[i] = {err = failure}
        end
      end
      return out
    end,
    meta = function(keys)
      local key = one_key(keys, 'edgecache_get_meta')
      local store, json, ts = read(key)
      return '{"key":' .. quote(utf8_lossy(key)) .. ',"format":"' .. store ..
        '","ts_ms":' .. (ts or 'null') .. ',"value":' .. json .. '}'
    end,
  }
  -- Runs one entry point: its reply, or the documented error as the reply
  -- (returned, not raised: Redis would append the script's name and line).
  return function(name, keys)
    failure = nil
    local ok, reply = pcall(api[name], keys)
    if ok then return reply end
    if failure then return {err = failure} end
    error(reply)
  end
end

-- Redis 7.0 runs the library's top level with only `redis` in scope (no
-- string, table or math), so everything else is built on the first call.
local impl
local function call(name)
  return function(keys)
    impl = impl or boot()
    return impl(name, keys)
  end
end

redis.register_function{function_name = 'edgecache_get', callback = call('get'), flags = {'no-writes'}}
redis.register_function{function_name = 'edgecache_mget', callback = call('mget'), flags = {'no-writes'}}
redis.register_function{function_name = 'edgecache_get_meta', callback = call('meta'), flags = {'no-writes'}}
