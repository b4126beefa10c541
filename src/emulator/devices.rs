//! Simulated device traffic for demos and `iot-sub emulate`: a fleet of devices in three
//! products producing the topic families a consumer group receives (`aliyun-huawei.md` §8),
//! deterministic from a seed.
//!
//! Payload shapes follow Aliyun's documented forwarding formats; values are invented. Local
//! times are rendered in UTC+8 (China Standard Time), where Aliyun's IoT regions mostly are.

use serde_json::{json, Map, Value};

use super::{DeviceMessage, ExtraValue};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Meter,
    Thermostat,
    Gateway,
}

struct Product {
    key: &'static str,
    kind: Kind,
    device_type: &'static str,
    prefix: &'static str,
}

const PRODUCTS: [Product; 3] = [
    Product {
        key: "a1DemoMeter",
        kind: Kind::Meter,
        device_type: "ElectricityMeter",
        prefix: "meter",
    },
    Product {
        key: "a1DemoThermo",
        kind: Kind::Thermostat,
        device_type: "Thermostat",
        prefix: "thermo",
    },
    Product {
        key: "a1DemoGateway",
        kind: Kind::Gateway,
        device_type: "Gateway",
        prefix: "gw",
    },
];

/// The topic families, in the order `next_message` cycles through them (property posts are
/// the bulk of real traffic, so they come up most often).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Property,
    Event,
    Status,
    Lifecycle,
    CustomBinary,
    CustomText,
}

const CYCLE: [Family; 12] = [
    Family::Property,
    Family::Property,
    Family::Event,
    Family::Status,
    Family::Property,
    Family::CustomBinary,
    Family::Property,
    Family::CustomText,
    Family::Lifecycle,
    Family::Property,
    Family::Status,
    Family::Event,
];

/// Offline reason codes as seen in status payloads (`offlineReasonCode`).
const OFFLINE_REASONS: [i64; 3] = [427, 429, 406];

struct Device {
    product: usize,
    name: String,
    iot_id: String,
    online: bool,
    client_ip: String,
    last_change_ms: Option<i64>,
    energy_kwh: f64,
    seq: u16,
}

/// Simulated devices in 3 products (`a1DemoMeter`, `a1DemoThermo`, `a1DemoGateway`).
pub struct Fleet {
    rng: fastrand::Rng,
    devices: Vec<Device>,
    step: u64,
    next_id: u64,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("devices", &self.devices.len())
            .field("step", &self.step)
            .finish()
    }
}

impl Fleet {
    /// `devices` devices (at least 1), spread round-robin over the products. Same seed, same
    /// messages.
    pub fn new(seed: u64, devices: usize) -> Fleet {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut per_product = [0usize; PRODUCTS.len()];
        let devices = (0..devices.max(1))
            .map(|i| {
                let product = i % PRODUCTS.len();
                per_product[product] += 1;
                Device {
                    product,
                    name: format!("{}-{:04}", PRODUCTS[product].prefix, per_product[product]),
                    iot_id: (0..20).map(|_| rng.alphanumeric()).collect(),
                    online: false,
                    client_ip: format!("203.0.113.{}", rng.u8(1..=254)),
                    last_change_ms: None,
                    energy_kwh: f64::from(rng.u32(100..5000)) + 0.25,
                    seq: 0,
                }
            })
            .collect();
        // 19-digit ids like Aliyun's, increasing with random gaps: unique and plausible.
        let next_id = 1_400_000_000_000_000_000 + rng.u64(0..100_000_000_000_000_000);
        Fleet {
            rng,
            devices,
            step: 0,
            next_id,
        }
    }

    /// The next message, generated at `now_ms` (also its `generateTime`).
    pub fn next_message(&mut self, now_ms: i64) -> DeviceMessage {
        let family = CYCLE[(self.step % CYCLE.len() as u64) as usize];
        self.step += 1;
        let index = self.rng.usize(..self.devices.len());
        let message_id = self.next_id.to_string();
        self.next_id += self.rng.u64(1..=997);

        let (topic, body, extra_properties) = match family {
            Family::Property => self.property_post(index, now_ms),
            Family::Event => self.event_post(index, now_ms),
            Family::Status => self.status(index, now_ms),
            Family::Lifecycle => self.lifecycle(index, now_ms),
            Family::CustomBinary => self.custom_binary(index),
            Family::CustomText => self.custom_text(index, now_ms),
        };
        DeviceMessage {
            topic,
            message_id,
            generate_time: now_ms,
            body,
            extra_properties,
        }
    }

    fn ids(&self, index: usize) -> (&'static Product, &Device) {
        let d = &self.devices[index];
        (&PRODUCTS[d.product], d)
    }

    fn round(&mut self, lo: f64, hi: f64, digits: i32) -> f64 {
        let v = lo + (hi - lo) * self.rng.f64();
        let p = 10f64.powi(digits);
        (v * p).round() / p
    }

    fn property_post(
        &mut self,
        index: usize,
        now: i64,
    ) -> (String, Vec<u8>, Vec<(String, ExtraValue)>) {
        let kind = PRODUCTS[self.devices[index].product].kind;
        let mut items = Map::new();
        let item = |items: &mut Map<String, Value>, name: &str, value: Value, t: i64| {
            items.insert(name.to_string(), json!({ "value": value, "time": t }));
        };
        let t = now - i64::from(self.rng.u16(0..800));
        match kind {
            Kind::Meter => {
                let added = self.round(0.01, 0.4, 2);
                self.devices[index].energy_kwh += added;
                let energy = (self.devices[index].energy_kwh * 100.0).round() / 100.0;
                let voltage = self.round(214.0, 236.0, 1);
                let current = self.round(0.2, 15.0, 2);
                item(&mut items, "Voltage", json!(voltage), t);
                item(&mut items, "Current", json!(current), t);
                item(
                    &mut items,
                    "ActivePower",
                    json!((voltage * current).round()),
                    t,
                );
                item(&mut items, "EnergyTotal", json!(energy), t);
            }
            Kind::Thermostat => {
                let temp = self.round(16.0, 29.5, 1);
                let hum = self.rng.u8(25..80);
                let target = [20, 21, 22, 23, 24][self.rng.usize(..5)];
                item(&mut items, "CurrentTemperature", json!(temp), t);
                item(&mut items, "CurrentHumidity", json!(hum), t);
                item(&mut items, "TargetTemperature", json!(target), t);
                item(&mut items, "PowerSwitch", json!(self.rng.u8(0..=1)), t);
            }
            Kind::Gateway => {
                let cpu = self.rng.u8(1..95);
                let mem = self.rng.u8(20..90);
                item(&mut items, "CPUUsage", json!(cpu), t);
                item(&mut items, "MemoryUsage", json!(mem), t);
                item(&mut items, "SubDeviceCount", json!(self.rng.u8(0..32)), t);
                item(
                    &mut items,
                    "SignalStrength",
                    json!(-i32::from(self.rng.u8(40..100))),
                    t,
                );
            }
        }
        let failed = self.rng.u8(0..6) == 0;
        let (product, device) = self.ids(index);
        let mut body = json!({
            "iotId": device.iot_id,
            "requestId": (now % 100_000).to_string(),
            "productKey": product.key,
            "deviceName": device.name,
            "gmtCreate": now,
            "deviceType": product.device_type,
            "items": items,
        });
        if failed {
            // A value outside the TSL range: the platform forwards it under checkFailedData.
            let (name, value) = match product.kind {
                Kind::Meter => ("Voltage", json!(512.7)),
                Kind::Thermostat => ("CurrentTemperature", json!(-273.2)),
                Kind::Gateway => ("CPUUsage", json!(180)),
            };
            body["checkFailedData"] = json!({
                name: {
                    "value": value,
                    "time": t,
                    "code": 6304,
                    "message": "tsl parse: params value exceeds the defined range",
                }
            });
        }
        let topic = format!("/{}/{}/thing/event/property/post", product.key, device.name);
        (
            topic,
            body.to_string().into_bytes(),
            vec![("qos".into(), ExtraValue::Int(1))],
        )
    }

    fn event_post(
        &mut self,
        index: usize,
        now: i64,
    ) -> (String, Vec<u8>, Vec<(String, ExtraValue)>) {
        let kind = PRODUCTS[self.devices[index].product].kind;
        let (event_id, name, kind_str, value) = match kind {
            Kind::Meter => {
                let v = self.round(250.0, 265.0, 1);
                (
                    "OverVoltageAlarm",
                    "Over-voltage alarm",
                    "alert",
                    json!({ "Voltage": v }),
                )
            }
            Kind::Thermostat => {
                let v = self.round(38.0, 45.0, 1);
                (
                    "HighTemperatureAlarm",
                    "High temperature",
                    "alert",
                    json!({ "CurrentTemperature": v }),
                )
            }
            Kind::Gateway => {
                let code = self.rng.u8(1..9);
                (
                    "Error",
                    "Fault report",
                    "error",
                    json!({ "ErrorCode": code, "Message": "sub-device response timeout" }),
                )
            }
        };
        let (product, device) = self.ids(index);
        let body = json!({
            "identifier": event_id,
            "name": name,
            "type": kind_str,
            "iotId": device.iot_id,
            "requestId": (now % 100_000).to_string(),
            "productKey": product.key,
            "deviceName": device.name,
            "gmtCreate": now,
            "value": value,
            "time": now,
        });
        let topic = format!(
            "/{}/{}/thing/event/{}/post",
            product.key, device.name, event_id
        );
        (
            topic,
            body.to_string().into_bytes(),
            vec![("qos".into(), ExtraValue::Int(1))],
        )
    }

    fn status(&mut self, index: usize, now: i64) -> (String, Vec<u8>, Vec<(String, ExtraValue)>) {
        let reason = OFFLINE_REASONS[self.rng.usize(..OFFLINE_REASONS.len())];
        let back = i64::from(self.rng.u32(1_000..3_600_000));
        let d = &mut self.devices[index];
        d.online = !d.online;
        let last = d.last_change_ms.unwrap_or(now - back);
        d.last_change_ms = Some(now);
        let (product, device) = self.ids(index);
        let (time, utc_time) = render_times(now);
        let (last_time, utc_last_time) = render_times(last);
        let mut body = json!({
            "status": if device.online { "online" } else { "offline" },
            "iotId": device.iot_id,
            "productKey": product.key,
            "deviceName": device.name,
            "time": time,
            "utcTime": utc_time,
            "lastTime": last_time,
            "utcLastTime": utc_last_time,
            "clientIp": device.client_ip,
        });
        if !device.online {
            body["offlineReasonCode"] = json!(reason);
        }
        let topic = format!("/as/mqtt/status/{}/{}", product.key, device.name);
        (topic, body.to_string().into_bytes(), Vec::new())
    }

    fn lifecycle(
        &mut self,
        index: usize,
        now: i64,
    ) -> (String, Vec<u8>, Vec<(String, ExtraValue)>) {
        let action = ["enable", "disable", "create", "enable", "delete"][self.rng.usize(..5)];
        let secret: String = (0..32)
            .map(|_| char::from_digit(self.rng.u32(0..16), 16).unwrap_or('0'))
            .collect();
        let (product, device) = self.ids(index);
        let mut body = json!({
            "action": action,
            "iotId": device.iot_id,
            "productKey": product.key,
            "deviceName": device.name,
            "messageCreateTime": now,
        });
        if action == "create" {
            // Aliyun includes the new device's secret on create; this one is random filler.
            body["deviceSecret"] = json!(secret);
        }
        let topic = format!("/{}/{}/thing/lifecycle", product.key, device.name);
        (topic, body.to_string().into_bytes(), Vec::new())
    }

    fn custom_binary(&mut self, index: usize) -> (String, Vec<u8>, Vec<(String, ExtraValue)>) {
        let temp = self.rng.u16(0..1200);
        let d = &mut self.devices[index];
        d.seq = d.seq.wrapping_add(1);
        let seq = d.seq.to_be_bytes();
        let t = temp.to_be_bytes();
        // A raw TLV frame as a cheap MCU would send it: not UTF-8 (0xAA, 0xFF, 0xFE) and
        // with NUL bytes, forwarded unchanged on custom topics.
        let mut body = vec![
            0xAA, 0x55, 0x00, seq[0], seq[1], 0x01, 0x00, 0x02, t[0], t[1], 0xFF, 0xFE, 0x00,
        ];
        let checksum = body.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        body.push(checksum);
        let (product, device) = self.ids(index);
        let topic = format!("/{}/{}/user/raw", product.key, device.name);
        (topic, body, vec![("qos".into(), ExtraValue::Int(0))])
    }

    fn custom_text(
        &mut self,
        index: usize,
        now: i64,
    ) -> (String, Vec<u8>, Vec<(String, ExtraValue)>) {
        let rssi = -i32::from(self.rng.u8(40..100));
        let uptime = self.rng.u32(60..2_000_000);
        let (product, device) = self.ids(index);
        let (time, _) = render_times(now);
        let body = format!(
            "{time} INFO fw=1.4.2 boot ok rssi={rssi}dBm uptime={uptime}s dev={}",
            device.name
        );
        let topic = format!("/{}/{}/user/log", product.key, device.name);
        (
            topic,
            body.into_bytes(),
            vec![("qos".into(), ExtraValue::Int(0))],
        )
    }
}

/// (`yyyy-MM-dd HH:mm:ss.SSS` in UTC+8, ISO-8601 UTC with `Z`), the two forms in status payloads.
fn render_times(ms: i64) -> (String, String) {
    const CST_MS: i64 = 8 * 3600 * 1000;
    let fmt = |ms: i64, sep: char, z: &str| {
        let days = ms.div_euclid(86_400_000);
        let rem = ms.rem_euclid(86_400_000);
        let (y, m, d) = civil_from_days(days);
        let (h, mi, s, milli) = (
            rem / 3_600_000,
            rem / 60_000 % 60,
            rem / 1000 % 60,
            rem % 1000,
        );
        format!("{y:04}-{m:02}-{d:02}{sep}{h:02}:{mi:02}:{s:02}.{milli:03}{z}")
    };
    (fmt(ms + CST_MS, ' ', ""), fmt(ms, 'T', "Z"))
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn same_seed_same_messages() {
        let mut a = Fleet::new(7, 10);
        let mut b = Fleet::new(7, 10);
        for i in 0..100 {
            assert_eq!(
                a.next_message(1_700_000_000_000 + i),
                b.next_message(1_700_000_000_000 + i)
            );
        }
        let mut c = Fleet::new(8, 10);
        let differs = (0..20).any(|i| a.next_message(i) != c.next_message(i));
        assert!(differs);
    }

    #[test]
    fn covers_the_families_with_unique_19_digit_ids() {
        let mut f = Fleet::new(1, 9);
        let mut ids = HashSet::new();
        let mut seen = HashSet::new();
        let mut binary_with_nul = false;
        let mut offline_with_reason = false;
        let mut check_failed = false;
        let mut products = HashSet::new();
        for i in 0..600 {
            let m = f.next_message(1_714_528_800_123 + i);
            let parts: Vec<&str> = m.topic.split('/').collect();
            let pk = if m.topic.starts_with("/as/") {
                parts[4]
            } else {
                parts[1]
            };
            products.insert(pk.to_string());
            assert_eq!(m.message_id.len(), 19, "{}", m.message_id);
            assert!(m.message_id.bytes().all(|b| b.is_ascii_digit()));
            assert!(m.message_id.parse::<i64>().is_ok(), "fits an AMQP long");
            assert!(ids.insert(m.message_id.clone()));
            let family = if m.topic.starts_with("/as/mqtt/status/") {
                let v: Value = serde_json::from_slice(&m.body).unwrap();
                if v["status"] == "offline" && v["offlineReasonCode"].is_i64() {
                    offline_with_reason = true;
                }
                "status"
            } else if m.topic.ends_with("/thing/event/property/post") {
                let v: Value = serde_json::from_slice(&m.body).unwrap();
                assert!(v["items"].is_object());
                check_failed |= v.get("checkFailedData").is_some();
                "property"
            } else if m.topic.ends_with("/thing/lifecycle") {
                "lifecycle"
            } else if m.topic.contains("/thing/event/") && m.topic.ends_with("/post") {
                "event"
            } else if m.topic.ends_with("/user/raw") {
                assert!(std::str::from_utf8(&m.body).is_err());
                binary_with_nul |= m.body.contains(&0);
                "raw"
            } else if m.topic.ends_with("/user/log") {
                assert!(std::str::from_utf8(&m.body).is_ok());
                "text"
            } else {
                panic!("unexpected topic {}", m.topic)
            };
            seen.insert(family);
        }
        assert_eq!(seen.len(), 6, "{seen:?}");
        assert!(binary_with_nul && offline_with_reason && check_failed);
        assert_eq!(products.len(), 3, "{products:?}");
    }

    #[test]
    fn renders_status_times() {
        // 2024-05-01T02:00:00.123Z is 10:00 in UTC+8.
        let (local, utc) = render_times(1_714_528_800_123);
        assert_eq!(local, "2024-05-01 10:00:00.123");
        assert_eq!(utc, "2024-05-01T02:00:00.123Z");
        assert_eq!(render_times(0).1, "1970-01-01T00:00:00.000Z");
    }
}
